"""Serving-corpus build speed and memory: DuckDB on 10M and 100M engagements (the large preset),
Spark local on 10M.

    python benchmarks/corpus.py [--large /tmp/ebr-bench-synth-large] [--runs 3]

--large is a workspace holding the large preset (`python benchmarks/synth.py --presets large --keep`
leaves one at /tmp/ebr-bench-synth-large); the 10M workspace links a tenth of its engagement
parts. Each measurement runs in its own process (peak RSS is that process's); times are medians.
Target (issue 4): 100M in <= 60 s and <= 4 GiB peak RSS with DuckDB.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child, write  # noqa: E402

CHILD = """
import json, time, resource
from ebr.workspace import Workspace
from ebr.corpus.build import build_serving_corpus
from ebr.data.tables import connect
ws = Workspace.at({ws!r})
n = connect(ws).execute("SELECT count(*) FROM engagements").fetchone()[0]
t = time.time()
d = build_serving_corpus(ws, {engine!r}, top_n=1_000_000)
s = time.time() - t
m = json.load(open(d / "manifest.json"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({{"engine": {engine!r}, "engagements": n, "seconds": s, "query_seconds": m["seconds"]["corpus_query"],
                  "pins": m["counts"]["pins"], "self_peak_rss_gib": rss}}))
"""


def subset(large: Path, out: Path, fraction: float) -> Path:
    if out.exists():
        return out
    parts = sorted((large / "tables" / "engagements" / "synth").glob("*.parquet"))
    dst = out / "tables" / "engagements" / "synth"
    dst.mkdir(parents=True)
    for p in parts[: max(1, int(len(parts) * fraction))]:
        (dst / p.name).symlink_to(p)
    (out / "tables" / "pins").mkdir(parents=True)
    (out / "tables" / "pins" / "synth").symlink_to(large / "tables" / "pins" / "synth")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="/tmp/ebr-bench-synth-large")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    large = Path(a.large)
    if not (large / "tables" / "engagements").exists():
        raise SystemExit(f"{large} has no large preset: run `python benchmarks/synth.py --presets large --keep`")
    small = subset(large, Path(str(large) + "-10pct"), 0.1)
    env = {"EBR_DUCKDB_MEMORY": "3GB", "EBR_DUCKDB_THREADS": str(a.threads)}
    results = []
    for ws, engine in ((large, "duckdb"), (small, "duckdb"), (small, "spark")):
        runs = []
        for _ in range(a.runs if engine == "duckdb" else 1):
            shutil.rmtree(Path(ws) / "corpus", ignore_errors=True)
            runs.append(run_child(CHILD.format(ws=str(ws), engine=engine), env))
        r = {
            "engine": engine,
            "engagements": runs[0]["engagements"],
            "runs": len(runs),
            "median_seconds": statistics.median(x["seconds"] for x in runs),
            "median_query_seconds": statistics.median(x["query_seconds"] for x in runs),
            "peak_rss_gib_python_process": round(max(x["self_peak_rss_gib"] for x in runs), 3),
            "pins": runs[0]["pins"],
        }
        r["engagements_per_s"] = round(r["engagements"] / r["median_seconds"])
        results.append(r)
        print(r, flush=True)
    write(
        "corpus",
        {
            "results": results,
            "target": "100M <= 60 s, <= 4 GiB peak RSS (DuckDB)",
            "note": "peak RSS of the Python process that ran the query (DuckDB runs in it; Spark's JVM "
            "is a separate process with spark.driver.memory=2g)",
        },
    )


if __name__ == "__main__":
    main()
