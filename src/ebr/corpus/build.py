"""`ebr corpus build | eval | stats`: the serving corpus (TECHNIQUES.md 5).

corpus/VERSION/corpus.parquet holds one representative pin per coarse image signature, ranked by
the time-decayed engagement of the whole signature group over the window; the manifest records
inputs, parameters, counts (including rows the corpus did not use, by reason) and timings.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ebr.corpus.engine import load_sql, make_engine
from ebr.data.schema import POSITIVE_ACTIONS
from ebr.data.splits import load_split
from ebr.data.tables import connect
from ebr.data.validate import DataError
from ebr.log import log
from ebr.workspace import Workspace, file_sha256, library_versions, new_version, now_utc, read_json, write_json

DAY_US = 86400 * 10**6
DEFAULT_WEIGHTS = {"save": 3.0, "click": 2.0, "closeup": 1.0}


@dataclass
class CorpusParams:
    as_of_us: int
    window_days: float = 90.0
    half_life_days: float = 14.0
    decay: bool = True
    top_n: int = 1_000_000
    action_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def sql(self) -> dict[str, Any]:
        cases = " ".join(f"WHEN '{a}' THEN {float(w)!r}" for a, w in sorted(self.action_weights.items()))
        decay = (f"POWER(2.0, -({self.as_of_us}.0 - t) / {self.half_life_days * DAY_US!r})" if self.decay else "1.0")
        return {
            "as_of_us": self.as_of_us,
            "window_start_us": self.as_of_us - int(self.window_days * DAY_US),
            "weight_expr": f"CASE e.action {cases} ELSE 0.0 END",
            "decay_expr": decay,
            "top_n": int(self.top_n),
        }


def parse_weights(text: str) -> dict[str, float]:
    """'save=3,click=2,closeup=1' -> {'save': 3.0, ...}"""
    from ebr.data.schema import ACTIONS

    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise DataError(f"--action-weights: expected ACTION=WEIGHT pairs, got {part!r}")
        a, w = part.split("=", 1)
        if a.strip() not in ACTIONS:
            raise DataError(f"--action-weights: unknown action {a.strip()!r}; actions are {', '.join(ACTIONS)}")
        try:
            out[a.strip()] = float(w)
        except ValueError:
            raise DataError(f"--action-weights: {part.strip()!r} needs a number after '=' (e.g. save=3)") from None
        if not math.isfinite(out[a.strip()]) or out[a.strip()] < 0:
            raise DataError(f"--action-weights: {part.strip()!r}: a weight must be a finite number >= 0")
    return out


def default_as_of(ws: Workspace) -> tuple[int, str]:
    """The temporal split's cut when one exists, else just after the last engagement."""
    if "temporal" in ws.splits():
        return int(load_split(ws, "temporal").cut.timestamp() * 1e6), "split temporal cut"
    last = connect(ws).execute("SELECT epoch_us(max(ts)) FROM engagements").fetchone()[0]
    if last is None:
        raise DataError("no timestamped engagements: the corpus needs time (give --as-of)")
    return int(last) + 1, "last engagement"


def _us(t: dt.datetime) -> int:
    t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1e6)


def build_serving_corpus(ws: Workspace, engine: str = "duckdb", as_of: dt.datetime | None = None,
                         window_days: float = 90.0, half_life_days: float = 14.0, decay: bool = True,
                         top_n: int = 1_000_000, action_weights: dict[str, float] | None = None) -> Path:
    """Build corpus/VERSION/ and return its path."""
    t0 = time.time()
    as_of_us, as_of_source = (_us(as_of), "--as-of") if as_of else default_as_of(ws)
    p = CorpusParams(as_of_us, window_days, half_life_days, decay, top_n, action_weights or dict(DEFAULT_WEIGHTS))
    eng = make_engine(engine, ws)
    t_q = time.time()
    log.info("corpus: scoring engagements with %s (as of %s, %g-day window)", engine, as_of_source, p.window_days)
    corpus = eng.run(load_sql("corpus", p.sql()))
    t_corpus = time.time() - t_q
    bad = eng.run(load_sql("bad_rows", p.sql())).to_pylist()[0]
    eng.close()
    corpus = corpus.cast(pa.schema([
        ("pin_id", pa.string()), ("image_sig_coarse", pa.string()), ("score", pa.float64()),
        ("pin_score", pa.float64()), ("n_engagements", pa.int64()), ("group_pins", pa.int64())]))
    version = new_version(json.dumps(asdict(p), sort_keys=True) + engine)
    d = ws.corpus_dir() / version
    d.mkdir(parents=True)
    pq.write_table(corpus, d / "corpus.parquet")
    inputs = [{"path": str(f), "sha256": file_sha256(f, limit=1 << 24)}
              for t in ("engagements", "pins") for f in sorted(ws.table_dir(t).glob("*/*.parquet"))[:50]]
    manifest = {
        "version": version, "engine": engine, "created_at": now_utc().isoformat(),
        "as_of": dt.datetime.fromtimestamp(as_of_us / 1e6, dt.UTC).isoformat(), "as_of_source": as_of_source,
        "params": asdict(p), "inputs": inputs,
        "counts": {"pins": corpus.num_rows, **{k: int(v or 0) for k, v in bad.items()}},
        "seconds": {"corpus_query": round(t_corpus, 3), "total": round(time.time() - t0, 3)},
        "libraries": library_versions(),
    }
    write_json(d / "manifest.json", manifest)
    return d


def resolve(ws: Workspace, version: str | None) -> Path:
    """A corpus folder by version, 'latest' or None (= latest)."""
    if version in (None, "latest"):
        d = ws.latest("corpus")
        if d is None:
            raise DataError(f"no corpus in {ws.root}/corpus; build one with `ebr corpus build`")
        return d
    d = ws.corpus_dir() / version
    if not (d / "manifest.json").exists():
        raise DataError(f"no corpus {version!r} in {ws.corpus_dir()}")
    return d


def corpus_coverage(ws: Workspace, version: str | None = None, horizon_days: float = 7.0,
                    engine: str = "duckdb") -> dict[str, Any]:
    """Share of the next `horizon_days`' positive engagements (after as-of) whose pin, or a
    duplicate of it, is in the corpus."""
    d = resolve(ws, version)
    m = read_json(d / "manifest.json")
    eng = make_engine(engine, ws)
    eng.register("corpus", d / "corpus.parquet")
    row = eng.run(load_sql("corpus_eval", {
        "as_of_us": m["params"]["as_of_us"], "horizon_us": int(horizon_days * DAY_US),
        "positive_actions": ", ".join(f"'{a}'" for a in POSITIVE_ACTIONS)})).to_pylist()[0]
    eng.close()
    pos, cov = int(row["positives"] or 0), int(row["covered"] or 0)
    return {"corpus": m["version"], "as_of": m["as_of"], "pins": m["counts"]["pins"], "decay": m["params"]["decay"],
            "horizon_days": horizon_days, "positives": pos, "covered": cov, "coverage": cov / pos if pos else float("nan")}  # noqa: E501


def pin_statistics(
    ws: Workspace,
    as_of_us: int,
    engine: str = "duckdb",
    windows_days: tuple[int, ...] = (7, 30, 90),
    actions: tuple[str, ...] = POSITIVE_ACTIONS,
) -> pa.Table:
    """Per coarse signature: count of each action over each window before as_of (serving side)."""
    cols = ",\n".join(
        f"  SUM(CASE WHEN e.action = '{a}' AND unix_micros(e.ts) >= {as_of_us - w * DAY_US} THEN 1 ELSE 0 END) AS {a}_{w}d"  # noqa: E501
        for a in actions
        for w in windows_days
    )
    eng = make_engine(engine, ws)
    out = eng.run(
        load_sql(
            "pin_stats", {"as_of_us": as_of_us, "max_window_us": max(windows_days) * DAY_US, "count_columns": cols}
        )
    )
    eng.close()
    return out
