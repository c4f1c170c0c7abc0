"""Per-feature ablation of the two-tower model: the default config, then each of the #16 additions
switched off on its own (followed/pin interests, pin age, recent counts, refit, the recency
half-life choice, both per-dataset choices), and all of them off; 3 seeds each, through
benchmarks/quality.py (same harness, same caching).

    python benchmarks/ablation.py [--datasets ml100k,ml100k_llo] [--seeds 0,1,2]
                                  [--variants default,no_interests,...] [--root /tmp/ebr-bench-quality]
                                  [--name ablation]

Writes benchmarks/results/NAME.json with a markdown table of recall@50/100 (mean ± sample std).
The default variant is the quality table's own runs (`--name quality`), so nothing is trained twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no_interests": ["features.interest_features=false"],
    "no_age": ["features.pin_age=false"],
    "no_counts": ["features.pin_counts=false"],
    "no_refit": ["train.refit=false"],
    "no_recency": ["train.choose_recency_days=[]"],
    "no_choice": ["train.choose_pin_id=false", "train.choose_recency_days=[]"],
    "none_of_them": ["features.interest_features=false", "features.pin_age=false", "features.pin_counts=false",
                     "train.refit=false", "train.choose_pin_id=false", "train.choose_recency_days=[]"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ml100k,ml100k_llo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--root", default="/tmp/ebr-bench-quality")
    ap.add_argument("--name", default="ablation", help="results/NAME.json")
    a = ap.parse_args()
    table: dict[str, dict] = {}
    for v in a.variants.split(","):
        name = "quality" if v == "default" else f"ablation_{v}"
        cmd = [sys.executable, str(HERE / "quality.py"), "--datasets", a.datasets, "--seeds", a.seeds,
               "--root", a.root, "--name", name, "--no-write"]
        for s in VARIANTS[v]:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        table[v] = json.loads((Path(a.root) / f"{name}-table.json").read_text())
    metrics = ("recall@50", "recall@100")
    lines = ["| dataset | variant | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for ds in a.datasets.split(","):
        for v, t in table.items():
            m = t[ds]["models"]["two_tower"]
            lines.append(f"| {ds} | {v} | " + " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in metrics)
                         + " |")
    md = "\n".join(lines)
    print(md)
    write(a.name, {"variants": {v: VARIANTS[v] for v in table}, "table": {
        v: {ds: t[ds]["models"]["two_tower"] for ds in a.datasets.split(",")} for v, t in table.items()},
        "markdown": md, "seeds": a.seeds})


if __name__ == "__main__":
    main()
