"""Synthetic world generation: engagements/s and peak RSS per preset.

    python benchmarks/synth.py [--presets small,large] [--workspace /tmp/ebr-bench-synth]

Each preset runs in its own process (peak RSS is that process's). DuckDB and Arrow get explicit
memory and thread limits (EBR_DUCKDB_MEMORY, EBR_DUCKDB_THREADS, ARROW thread pool).
Target (issue 2): large (100M engagements) in <= 10 min with peak RSS <= 4 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child, write  # noqa: E402

CHILD = """
import json, time, pyarrow as pa
pa.set_cpu_count({threads}); pa.set_io_thread_count({threads})
from ebr.workspace import Workspace
from ebr.data.synth import generate
t = time.time()
e = generate(Workspace.at({ws!r}), {preset!r}, seed=0, progress=False)
n = e["tables"]["engagements"]["accepted"]
print(json.dumps({{"preset": {preset!r}, "engagements": n, "pins": e["tables"]["pins"]["accepted"],
                  "users": e["tables"]["users"]["accepted"], "seconds": round(time.time() - t, 2),
                  "engagements_per_s": round(n / (time.time() - t))}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,large")
    ap.add_argument("--workspace", default="/tmp/ebr-bench-synth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated workspaces")
    a = ap.parse_args()
    results = []
    for preset in a.presets.split(","):
        ws = f"{a.workspace}-{preset}"
        shutil.rmtree(ws, ignore_errors=True)
        env = {"EBR_DUCKDB_MEMORY": "2GB", "EBR_DUCKDB_THREADS": str(a.threads)}
        r = run_child(CHILD.format(ws=ws, preset=preset, threads=a.threads), env)
        r["disk_gib"] = round(sum(p.stat().st_size for p in Path(ws).rglob("*") if p.is_file()) / 2**30, 3)
        results.append(r)
        print(r, flush=True)
        if not a.keep:
            shutil.rmtree(ws, ignore_errors=True)
    write("synth", {"results": results, "target": "large <= 600 s, peak RSS <= 4 GiB"})


if __name__ == "__main__":
    main()
