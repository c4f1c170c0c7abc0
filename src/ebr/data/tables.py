"""Reading the tables: DuckDB views named engagements, pins, users, interests."""

from __future__ import annotations

import os
from typing import Any

import duckdb

from ebr.data.schema import SCHEMAS, TABLES
from ebr.workspace import Workspace

# Explicit limits keep DuckDB inside the machine's budget whatever the table size.
DEFAULT_MEMORY_LIMIT = os.environ.get("EBR_DUCKDB_MEMORY", "3GB")
DEFAULT_THREADS = int(os.environ.get("EBR_DUCKDB_THREADS", str(os.cpu_count() or 2)))


def sql_str(value: str) -> str:
    """A value for a single-quoted SQL literal (a path may contain quotes)."""
    return str(value).replace("'", "''")


def connect(
    ws: Workspace, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table (empty views for missing tables)."""
    ws.recover_imports()
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads})
    con.execute("SET preserve_insertion_order = false")
    for t in TABLES:
        if ws.has_table(t):
            con.execute(
                f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{sql_str(ws.table_glob(t))}', union_by_name = true)"
            )
        else:
            empty = SCHEMAS[t].empty_table()
            con.register(f"_{t}_empty", empty)
            con.execute(f"CREATE VIEW {t} AS SELECT * FROM _{t}_empty")
    return con


def stats(ws: Workspace) -> dict[str, Any]:
    """Row counts and the basic shape of the data (what `ebr data stats` prints)."""
    con = connect(ws)
    out: dict[str, Any] = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    if out["engagements"]:
        row = con.execute(
            "SELECT count(DISTINCT user_id), count(DISTINCT pin_id), min(ts), max(ts) FROM engagements"
        ).fetchone()
        out["active_users"], out["engaged_pins"] = row[0], row[1]
        out["first_ts"], out["last_ts"] = str(row[2]), str(row[3])
        out["actions"] = dict(
            con.execute("SELECT action, count(*) FROM engagements GROUP BY 1 ORDER BY 2 DESC").fetchall()
        )
        out["surfaces"] = dict(
            con.execute("SELECT surface, count(*) FROM engagements GROUP BY 1 ORDER BY 2 DESC").fetchall()
        )
        out["with_condition_interest"] = con.execute(
            "SELECT count(*) FROM engagements WHERE condition_interest IS NOT NULL"
        ).fetchone()[0]
    if out["pins"]:
        out["coarse_signatures"] = con.execute("SELECT count(DISTINCT image_sig_coarse) FROM pins").fetchone()[0]
    return out
