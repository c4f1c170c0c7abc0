"""Re-choose defaults away from the reported numbers: each candidate setting is trained on a
synthetic world with ANOTHER seed (seed 1; the README reports seed 0) and compared by that world's
test recall@100, so no default is picked on the test numbers we report.

    python benchmarks/defaults.py [--seeds 0,1,2] [--threads 2] [--root /tmp/ebr-bench-defaults]

Settings (one at a time against the current defaults, each with the full default pipeline,
refit included): the validation window (2% vs 10% of the training period), per-pin engagement
statistics as pin-tower features (off vs on), the crossing blocks' input normalisation
(`model.input_norm`: a LayerNorm per field vs one over the concatenation vs none), and the
regularisation candidates of the ML-100K validation sweep (uniform corpus negatives and dropout).
Resumable: a finished (setting, seed) keeps its eval JSON under --root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

from ebr.config import RunConfig  # noqa: E402
from ebr.data.splits import make_temporal  # noqa: E402
from ebr.data.synth import generate  # noqa: E402
from ebr.eval.evaluate import evaluate  # noqa: E402
from ebr.train.loop import train  # noqa: E402
from ebr.workspace import Workspace  # noqa: E402

SETTINGS = {  # name: (split val_fraction, config overrides)
    "default": (0.02, {}),
    "input_norm_global": (0.02, {"model.input_norm": "global"}),
    "input_norm_none": (0.02, {"model.input_norm": "none"}),
    "val_window_10pct": (0.10, {}),
    "pin_stats_on": (0.02, {"features.pin_stats": True}),
    # candidates from the ML-100K validation sweep (README "Defaults for every dataset")
    "mixneg_1024_dropout_0.2": (0.02, {"train.mixed_negatives": 1024, "model.dropout": 0.2}),
    "dropout_0.2": (0.02, {"model.dropout": 0.2}),
}
METRICS = ("recall@50", "recall@100", "recall@500")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="which rows, in this order")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per training run")
    ap.add_argument("--world-seed", type=int, default=1)
    ap.add_argument("--root", default="/tmp/ebr-bench-defaults")
    a = ap.parse_args()
    unknown = set(a.settings.split(",")) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)}; available: {', '.join(SETTINGS)}")
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    ws = Workspace.at(root / f"synth_small_world{a.world_seed}")
    if not ws.has_table("engagements"):
        generate(ws, "small", seed=a.world_seed, progress=False)
    rows = {}
    for name in a.settings.split(","):
        val_fraction, sets = SETTINGS[name]
        split = f"temporal_v{int(val_fraction * 100)}"
        if split not in ws.splits():
            make_temporal(ws, name=split, val_fraction=val_fraction)
        runs = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = root / f"{name}-seed{seed}.json"
            if not out.exists():
                cfg = RunConfig.load(None, {"train.seed": seed, "data.split": split, **sets})
                summary = train(ws, cfg, run=f"{name}-seed{seed}", progress=False)
                res = evaluate(ws, f"{name}-seed{seed}", split, peers=(), progress=False)
                out.write_text(json.dumps({**res, "train": summary}))
            runs.append(json.loads(out.read_text()))
            print(f"{name} seed {seed}: recall@100 {runs[-1]['results'][0]['recall@100']:.4f}", flush=True)
        vals = {m: [r["results"][0][m] for r in runs] for m in METRICS}
        rows[name] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                      for m, v in vals.items()}
        rows[name]["best_val_recall@100"] = [r["train"]["best_val_recall@100"] for r in runs]
    head = f"| setting (world seed {a.world_seed}) | " + " | ".join(METRICS) + " | val recall@100 |"
    lines = [head, "|---|" + "---|" * (len(METRICS) + 1)]
    for name, m in rows.items():
        v = m["best_val_recall@100"]  # the selection phase's, on this setting's own validation window
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        lines.append(f"| {name} | " + " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in METRICS)
                     + f" | {np.mean(v):.4f} ± {sd:.4f} |")
    md = "\n".join(lines)
    print(md)
    write("defaults", {"rows": rows, "markdown": md, "seeds": a.seeds, "world_seed": a.world_seed,
                       "threads": a.threads})


if __name__ == "__main__":
    main()
