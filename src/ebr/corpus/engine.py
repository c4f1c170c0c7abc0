"""Runs the corpus SQL files unchanged on DuckDB (default) or Spark SQL (local mode, for scale).

The SQL uses a dialect both engines accept; `{{name}}` placeholders are filled with literals here.
`unix_micros(ts)` is built into Spark and defined as a macro for DuckDB. Both engines read the
workspace's Parquet tables as views named engagements and pins (and corpus, when given).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from ebr.data.tables import DEFAULT_MEMORY_LIMIT, DEFAULT_THREADS, connect, sql_str
from ebr.workspace import Workspace

ENGINES = ("duckdb", "spark")


def load_sql(name: str, params: dict[str, Any]) -> str:
    """The SQL file `sql/NAME.sql` with every {{placeholder}} replaced (a missing one is an error)."""
    text = resources.files("ebr.corpus").joinpath("sql", f"{name}.sql").read_text()

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in params:
            raise KeyError(f"{name}.sql needs parameter {key!r}")
        return str(params[key])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


class DuckDBEngine:
    name = "duckdb"

    def __init__(self, ws: Workspace, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS):
        self.con = connect(ws, memory_limit=memory_limit, threads=threads)
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute("CREATE MACRO unix_micros(t) AS epoch_us(t)")

    def register(self, name: str, table: pa.Table | Path) -> None:
        if isinstance(table, Path):
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{sql_str(table)}')")
        else:
            self.con.register(name, table)

    def run(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def close(self) -> None:
        self.con.close()


class SparkEngine:
    """Spark SQL in local mode (local[N]); the session is shared within a process."""

    name = "spark"
    _session = None

    def __init__(self, ws: Workspace, threads: int = DEFAULT_THREADS, memory: str = "2g"):
        from pyspark.sql import SparkSession

        if SparkEngine._session is None:
            os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
            SparkEngine._session = (
                SparkSession.builder.master(f"local[{threads}]")
                .appName("ebr-corpus")
                .config("spark.sql.session.timeZone", "UTC")
                .config("spark.driver.memory", memory)
                .config("spark.sql.shuffle.partitions", str(max(2, threads * 2)))
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")
                .config("spark.sql.ansi.enabled", "false")
                .getOrCreate()
            )
            SparkEngine._session.sparkContext.setLogLevel("ERROR")
        self.spark = SparkEngine._session
        for t in ("engagements", "pins"):
            if ws.has_table(t):
                self.spark.read.parquet(
                    *[str(p) for p in sorted(ws.table_dir(t).glob("*/*.parquet"))]
                ).createOrReplaceTempView(t)

    def register(self, name: str, table: pa.Table | Path) -> None:
        if isinstance(table, Path):
            self.spark.read.parquet(str(table)).createOrReplaceTempView(name)
        else:
            self.spark.createDataFrame(table.to_pandas()).createOrReplaceTempView(name)

    def run(self, sql: str) -> pa.Table:
        return self.spark.sql(sql).toArrow()

    def close(self) -> None:  # the session is kept for the process: starting one costs seconds
        pass


def make_engine(name: str, ws: Workspace):
    if name == "duckdb":
        return DuckDBEngine(ws)
    if name == "spark":
        return SparkEngine(ws)
    raise ValueError(f"unknown engine {name!r}; choose {' or '.join(ENGINES)}")
