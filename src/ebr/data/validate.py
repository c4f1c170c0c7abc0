"""Row validation, quarantine and the staged writer every import goes through.

Every import counts rows in = rows accepted + rows quarantined. Rejected rows land in
``quarantine/SOURCE/TABLE.parquet`` with a ``reason`` per row (and the raw record when the source
had one). A source is written to a staging folder and swapped in at the end, so a failed or
``--strict`` import leaves the previous data untouched, and importing the same input again
replaces that source's rows instead of adding duplicates.
"""

from __future__ import annotations

import collections
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ebr.data.schema import ACTIONS, SURFACES, TABLES, TS, full_schema
from ebr.errors import EbrError
from ebr.log import log
from ebr.workspace import (
    COMMIT_JOURNAL,
    Workspace,
    commit_hook,
    file_sha256,
    library_versions,
    now_utc,
    read_json,
    write_json,
)

RAW = "_raw"  # optional column holding the source record, kept only in quarantine


DEFAULT_MAX_FUTURE_DAYS = 1.0  # engagements later than the import time + this are quarantined


class DataError(EbrError, ValueError):
    """Bad input that the user must fix (message says what)."""


def parse_timestamps(values: pa.Array | np.ndarray | list) -> tuple[pa.Array, np.ndarray]:
    """Parse unix seconds or ISO-8601 strings into UTC timestamps.

    Returns (timestamps with nulls where unparseable, bool mask of malformed non-null inputs).
    Years outside 1970..2100 count as malformed: they are almost always unit mistakes.
    """
    s = pd.Series(values.to_pylist() if isinstance(values, pa.Array) else values, dtype=object)
    present = s.notna() & (s.astype(str).str.strip() != "")
    num = pd.to_numeric(s, errors="coerce")
    out = pd.to_datetime(num, unit="s", utc=True, errors="coerce")
    is_text = present & num.isna()
    if is_text.any():
        iso = pd.to_datetime(s[is_text].astype(str), utc=True, errors="coerce", format="ISO8601")
        out = out.astype("datetime64[us, UTC]")
        out[is_text] = iso.astype("datetime64[us, UTC]")
    out = pd.Series(out, dtype="datetime64[us, UTC]")
    years = out.dt.year
    out[(years < 1970) | (years > 2100)] = pd.NaT
    bad = (present & out.isna()).to_numpy().copy()
    return pa.array(out, type=TS), bad


def _null_or_empty(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        empty = pc.equal(pc.utf8_trim_whitespace(col.fill_null("x")), "").to_numpy(zero_copy_only=False)
        return null | empty
    return null


class _Reasons:
    """First failing check wins; later checks only fill rows that are still clean."""

    def __init__(self, n: int, pre: np.ndarray | None = None):
        self.r = np.full(n, None, dtype=object) if pre is None else pre.astype(object).copy()

    def add(self, mask: np.ndarray, reason: str | np.ndarray) -> None:
        m = np.asarray(mask, dtype=bool) & pd.isna(self.r)
        if isinstance(reason, np.ndarray):
            self.r[m] = reason[m]
        else:
            self.r[m] = reason

    @property
    def bad(self) -> np.ndarray:
        return ~pd.isna(self.r)


def _not_in(col: pa.ChunkedArray, ref: pa.Array | None) -> np.ndarray:
    if ref is None:
        return np.zeros(len(col), dtype=bool)
    inside = pc.or_kleene(pc.is_in(col, value_set=ref), pc.is_null(col))  # nulls are checked apart
    return ~inside.to_numpy(zero_copy_only=False)


def _label(prefix: str, values: pa.ChunkedArray) -> np.ndarray:
    return np.array([f"{prefix} {v!r}" for v in values.to_pylist()], dtype=object)


def check_rows(
    table: str,
    tbl: pa.Table,
    refs: dict[str, pa.Array],
    embedding_dim: int | None,
    pre_reasons: np.ndarray | None = None,
    max_ts: pd.Timestamp | None = None,
) -> np.ndarray:
    """Reason per row (None = valid) for one batch of a table. Engagements after `max_ts` (the
    import's clock plus a horizon) are quarantined: a future timestamp is a unit or clock mistake."""
    n = tbl.num_rows
    R = _Reasons(n, pre_reasons)
    if table == "engagements":
        if max_ts is not None:
            ts = tbl["ts"].cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
            R.add(np.nan_to_num(ts, nan=-np.inf) > max_ts.value / 1e3, "timestamp in the future (after the import "
                  "time + the horizon; --max-future-days)")
        R.add(_null_or_empty(tbl["user_id"]), "null user_id")
        R.add(_null_or_empty(tbl["pin_id"]), "null pin_id")
        act = tbl["action"]
        bad_act = _not_in(act, pa.array(ACTIONS)) | act.is_null().to_numpy(zero_copy_only=False)
        if bad_act.any():
            R.add(bad_act, _label("unknown action", act))
        surf = tbl["surface"]
        bad_surf = _not_in(surf, pa.array(SURFACES)) | surf.is_null().to_numpy(zero_copy_only=False)
        if bad_surf.any():
            R.add(bad_surf, _label("unknown surface", surf))
        w = tbl["weight"].to_numpy(zero_copy_only=False).astype(np.float64)
        R.add(~np.isfinite(w) | (w < 0), "invalid weight (must be a finite number >= 0)")
        R.add(_not_in(tbl["user_id"], refs.get("users")), "dangling user_id (not in users)")
        R.add(_not_in(tbl["pin_id"], refs.get("pins")), "dangling pin_id (not in pins)")
        cond = tbl["condition_interest"]
        R.add(_not_in(cond, refs.get("interests")), "dangling condition_interest (not in interests)")
    elif table == "pins":
        R.add(_null_or_empty(tbl["pin_id"]), "null pin_id")
        if embedding_dim is not None:
            lens = pc.list_value_length(tbl["embedding"]).to_numpy(zero_copy_only=False)
            present = ~tbl["embedding"].is_null().to_numpy(zero_copy_only=False)
            lens = np.where(present, np.nan_to_num(lens, nan=-1), embedding_dim)
            R.add(lens != embedding_dim, f"wrong embedding width (expected {embedding_dim})")
        if "interests" in refs:
            flat = pc.list_flatten(tbl["interests"])
            parents = pc.list_parent_indices(tbl["interests"]).to_numpy(zero_copy_only=False)
            bad_flat = _not_in(flat, refs["interests"])
            bad = np.zeros(n, dtype=bool)
            bad[parents[bad_flat]] = True
            R.add(bad, "dangling interest (not in interests)")
    elif table == "users":
        R.add(_null_or_empty(tbl["user_id"]), "null user_id")
        if "interests" in refs:
            col = tbl["followed_interests"]
            flat = pc.list_flatten(col)
            parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            bad = np.zeros(n, dtype=bool)
            bad[parents[_not_in(flat, refs["interests"])]] = True
            R.add(bad, "dangling followed interest (not in interests)")
    elif table == "interests":
        R.add(_null_or_empty(tbl["interest_id"]), "null interest_id")
    return R.r


class SourceWriter:
    """Validates and writes one source's tables; call ``commit()`` to swap them in.

    Typical use::

        with SourceWriter(ws, "movielens", inputs=[...], strict=False) as w:
            w.write("interests", tbl)
            w.write("pins", tbl)
            ...
    """

    KEY = {"pins": "pin_id", "users": "user_id", "interests": "interest_id"}

    def __init__(
        self,
        ws: Workspace,
        source: str,
        inputs: list[Path] | None = None,
        params: dict[str, Any] | None = None,
        strict: bool = False,
        embedding_dim: int | None = None,
        quiet: bool = False,
        max_future_days: float | None = DEFAULT_MAX_FUTURE_DAYS,
    ):
        if not source or "/" in source or source.startswith("."):
            raise DataError(f"invalid source name {source!r}: use letters, digits, - or _")
        self.ws, self.source, self.strict, self.quiet = ws, source, strict, quiet
        self.inputs = [Path(p) for p in (inputs or [])]
        self.params = params or {}
        self.embedding_dim = embedding_dim
        self.max_ts = None if max_future_days is None else pd.Timestamp(now_utc()) + pd.Timedelta(days=max_future_days)
        ws.recover_imports()  # a crashed earlier commit is finished before its stage is reused
        self.stage = ws.stage_dir(source)
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir(parents=True)
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.parts: collections.Counter = collections.Counter()
        self.refs: dict[str, pa.Array] = {}
        self._seen: dict[str, list[pa.Array]] = collections.defaultdict(list)
        self._schemas: dict[str, pa.Schema] = {}
        self._qwriters: dict[str, pq.ParquetWriter] = {}
        self.extra: dict[str, Any] = {}
        self.t0 = time.time()

    # -- context manager: a failure discards the staging folder, the old source stays -----------
    def __enter__(self) -> SourceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._close_quarantine()
            if (self.stage / COMMIT_JOURNAL).exists():
                return  # committed: the next reader or import rolls it forward
            shutil.rmtree(self.stage, ignore_errors=True)

    def _conform(self, table: str, tbl: pa.Table) -> pa.Table:
        schema = self._schemas.get(table)
        if schema is None:
            schema = self._schemas[table] = full_schema(table, tbl.schema)
        cols = []
        for f in schema:
            if f.name in tbl.column_names:
                cols.append(tbl[f.name].cast(f.type))
            elif f.nullable:
                cols.append(pa.nulls(tbl.num_rows, f.type))
            elif f.name == "weight":
                cols.append(pa.array(np.ones(tbl.num_rows, dtype=np.float32)))
            elif f.name == "surface":
                cols.append(pa.array(["other"] * tbl.num_rows))
            else:
                raise DataError(f"{table}: missing required column {f.name!r}")
        return pa.Table.from_arrays(cols, schema=schema)

    def write(self, table: str, tbl: pa.Table, pre_reasons: np.ndarray | None = None) -> int:
        """Validate one batch; write accepted rows as a Parquet part. Returns rows accepted."""
        raw = tbl[RAW] if RAW in tbl.column_names else None
        if table == "pins" and self.embedding_dim is None and "embedding" in tbl.column_names:
            lens = pc.list_value_length(tbl["embedding"]).drop_null()
            if len(lens):
                self.embedding_dim = int(pc.mode(lens)[0]["mode"].as_py())
        tbl = self._conform(table, tbl)
        reasons = check_rows(table, tbl, self.refs, self.embedding_dim, pre_reasons, self.max_ts)
        if table in self.KEY:  # duplicate keys within the source
            key = tbl[self.KEY[table]]
            prev = pa.chunked_array(self._seen[table], type=pa.string()) if self._seen[table] else None
            dup = np.zeros(tbl.num_rows, dtype=bool)
            if prev is not None:
                dup |= ~_not_in(key, prev.combine_chunks())
            codes = pd.Series(key.to_numpy(zero_copy_only=False)).duplicated().to_numpy()
            dup |= codes
            R = _Reasons(tbl.num_rows, reasons)
            R.add(dup, f"duplicate {self.KEY[table]}")
            reasons = R.r
        bad = ~pd.isna(reasons)
        n_bad = int(bad.sum())
        good = tbl.filter(pa.array(~bad)) if n_bad else tbl
        self.counts[table]["in"] += tbl.num_rows
        self.counts[table]["accepted"] += good.num_rows
        self.counts[table]["quarantined"] += n_bad
        if n_bad:
            q = tbl.filter(pa.array(bad))
            for f in list(q.schema):  # quarantine keeps values readable whatever their type
                if pa.types.is_list(f.type):
                    as_text = pc.cast(q[f.name], pa.list_(pa.string()))
                    q = q.set_column(q.schema.get_field_index(f.name), f.name, as_text)
            q = q.append_column("reason", pa.array(reasons[bad].astype(str)))
            q = q.append_column(
                "raw", raw.filter(pa.array(bad)).cast(pa.string()) if raw is not None else pa.nulls(n_bad, pa.string())
            )
            self.reasons[table].update(collections.Counter(reasons[bad].tolist()))
            self._quarantine(table, q)
        if table in self.KEY:
            self._seen[table].append(good[self.KEY[table]].combine_chunks())
        if good.num_rows:
            d = self.stage / "tables" / table
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(good, d / f"part-{self.parts[table]:05d}.parquet", row_group_size=1 << 20)
            self.parts[table] += 1
        return good.num_rows

    def row_reasons(self, table: str, tbl: pa.Table, pre_reasons: np.ndarray | None = None) -> np.ndarray:
        """The row-level checks of `write` without references to other tables and without writing:
        which rows would be rejected on their own (so ids-only pins/users come from good rows only)."""
        return check_rows(table, self._conform(table, tbl), {}, self.embedding_dim, pre_reasons, self.max_ts)

    def seal(self, table: str) -> None:
        """Declare a table complete: later tables are checked against its ids (dangling refs)."""
        if self._seen[table]:
            self.refs[table] = pa.chunked_array(self._seen[table], type=pa.string()).combine_chunks()
        else:
            self.refs[table] = pa.array([], type=pa.string())

    def _quarantine(self, table: str, q: pa.Table) -> None:
        q = q.cast(pa.schema([f.with_nullable(True) for f in q.schema]))
        w = self._qwriters.get(table)
        if w is None:
            d = self.stage / "quarantine"
            d.mkdir(parents=True, exist_ok=True)
            w = self._qwriters[table] = pq.ParquetWriter(d / f"{table}.parquet", q.schema)
        w.write_table(q.cast(w.schema))

    def _close_quarantine(self) -> None:
        for w in self._qwriters.values():
            w.close()
        self._qwriters.clear()

    def summary(self) -> str:
        lines = [f"import {self.source!r}: rows in = accepted + quarantined"]
        for t, c in self.counts.items():
            lines.append(f"  {t:<12} {c['in']:>12,} = {c['accepted']:>12,} + {c['quarantined']:>9,}")
            for reason, k in self.reasons[t].most_common(6):
                lines.append(f"      {k:>9,}  {reason}")
        if any(c["quarantined"] for c in self.counts.values()):
            lines.append(f"  quarantined rows: {self.ws.quarantine_dir(self.source)}/TABLE.parquet")
        return "\n".join(lines)

    def commit(self) -> dict[str, Any]:
        """Swap the staged source in (replacing any earlier import of it) and write manifests."""
        self._close_quarantine()
        total_bad = sum(c["quarantined"] for c in self.counts.values())
        if self.strict and total_bad:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise DataError(
                f"--strict: {total_bad:,} bad rows in source {self.source!r}; nothing was written.\n" + self.summary()
            )
        entry = {
            "imported_at": now_utc().isoformat(),
            "inputs": [
                {"path": str(p), "sha256": file_sha256(p, limit=1 << 30) if p.is_file() else None} for p in self.inputs
            ],
            "params": self.params,
            "tables": {
                t: {**dict(c), "parts": self.parts[t], "reasons": dict(self.reasons[t])} for t, c in self.counts.items()
            },
            "embedding_dim": self.embedding_dim,
            "seconds": round(time.time() - self.t0, 3),
            "libraries": library_versions(),
            **self.extra,
        }
        # the complete new state is staged (every table folder, empty or not, the quarantine and
        # the manifest); the journal makes the import roll forward from here, whatever happens
        for t in TABLES:
            (self.stage / "tables" / t).mkdir(parents=True, exist_ok=True)
        (self.stage / "quarantine").mkdir(exist_ok=True)
        path = self.ws.root / "tables" / "manifest.json"
        manifest = read_json(path) if path.exists() else {"sources": {}}
        manifest["sources"][self.source] = entry
        write_json(self.stage / "manifest.json", manifest)
        commit_hook("staged")
        write_json(self.stage / COMMIT_JOURNAL, {"source": self.source, "at": now_utc().isoformat()})
        commit_hook("journal")
        self.ws.roll_forward(self.source)
        if not self.quiet:
            log.info(self.summary())
        return entry
