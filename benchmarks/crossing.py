"""Crossing blocks compared: mlp vs masknet vs dhen, at default sizes and at a matched parameter
budget, on the synthetic world and ML-100K (temporal), 3 seeds, a fixed step budget per run.

    python benchmarks/crossing.py [--datasets synth_small,ml100k] [--seeds 0,1,2] [--steps 1500]
                                  [--budgets default,matched] [--threads 2] [--root /tmp/ebr-bench-crossing]

Reports Recall@50/100 (mean ± std over seeds), training examples/s, crossing parameter counts and
the latency of one user-tower request (exported tower, batch 1, median of 200 calls).
No refit (the blocks are compared at the same step budget on the training part; a refit would
double the time and change nothing between them).
Resumable: each finished (dataset, budget, crossing, seed) keeps its JSON under --root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402
from quality import prepare  # noqa: E402

from ebr.config import NO_CHOICE, RunConfig  # noqa: E402
from ebr.eval.evaluate import evaluate  # noqa: E402
from ebr.index.bundle import find_bundle  # noqa: E402
from ebr.model.towers import TwoTower  # noqa: E402
from ebr.serve.retriever import Retriever  # noqa: E402
from ebr.train.loop import train  # noqa: E402

KINDS = ("mlp", "masknet", "dhen")


# learning rates per crossing, from a 200-step probe on the tiny world (loss after 200 steps):
# MaskNet and DHEN stall near ln(batch) for hundreds of steps at the MLP's 2e-3
LR = {"mlp": 2e-3, "masknet": 5e-4, "dhen": 1e-3}


def overrides(kind: str, budget: str) -> dict:
    o = {"model.crossing": kind, "train.lr": LR[kind]}
    if budget == "matched":  # sizes chosen so that the three crossings have about the same parameters
        o.update({"mlp": {"model.hidden": [880, 440]},
                  "masknet": {"model.masknet.q": 128, "model.masknet.bottleneck": 512},
                  "dhen": {"model.dhen.width": 176, "model.dhen.mlp_hidden": 352, "model.masknet.q": 64,
                           "model.masknet.bottleneck": 176}}[kind])
    return o


def crossing_params(model: TwoTower) -> int:
    return sum(p.numel() for m in (model.user.crossing, model.pin.crossing) for p in m.parameters())


def tower_latency_ms(r: Retriever, reps: int = 200) -> float:
    code = next(c for c in range(2, len(r.fs.users)) if r.is_warm(c))
    inputs = r.stored_inputs(np.array([code]))
    for _ in range(10):
        r.embed(*inputs)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        r.embed(*inputs)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="synth_small,ml100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--budgets", default="default,matched")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--root", default="/tmp/ebr-bench-crossing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (train ex/s and latency depend on it)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    rows = []
    for ds in a.datasets.split(","):
        ws = prepare(ds, root, {})
        for budget in a.budgets.split(","):
            for kind in a.kinds.split(","):
                runs = []
                for seed in [int(s) for s in a.seeds.split(",")]:
                    out = root / f"{ds}-{budget}-{kind}-{seed}.json"
                    if not out.exists():
                        run = f"{budget}-{kind}-{seed}"
                        cfg = RunConfig.load(None, {**overrides(kind, budget), "train.seed": seed,
                                                    "train.max_steps": a.steps, "train.epochs": 1000,
                                                    "train.patience": 1000, "train.refit": False, **NO_CHOICE})
                        s = train(ws, cfg, run=run, progress=False)
                        res = evaluate(ws, run, peers=(), progress=False)
                        r = Retriever(find_bundle(ws, run, res["split"]))
                        sizes = torch.load(ws.run_dir(run) / "checkpoints" / "best.pt", weights_only=True)["sizes"]
                        model = TwoTower(sizes, cfg.model)
                        out.write_text(json.dumps({
                            "recall@50": res["results"][0]["recall@50"], "recall@100": res["results"][0]["recall@100"],
                            "val_recall@100": s["best_val_recall@100"],
                            "examples_per_s": s["steps"] * cfg.train.batch_size / s["train_seconds"],
                            "crossing_params": crossing_params(model), "tower_latency_ms": tower_latency_ms(r),
                            "steps": s["steps"]}))
                    cell = json.loads(out.read_text())
                    if "val_recall@100" not in cell:  # cells written before the column: the run's own summary
                        summary = json.loads((ws.run_dir(f"{budget}-{kind}-{seed}") / "summary.json").read_text())
                        cell["val_recall@100"] = summary["best_val_recall@100"]
                    runs.append(cell)
                    print(ds, budget, kind, seed, runs[-1], flush=True)
                agg = {k: (float(np.mean([x[k] for x in runs])), float(np.std([x[k] for x in runs], ddof=1)))
                       for k in ("recall@50", "recall@100", "val_recall@100", "examples_per_s", "tower_latency_ms")}
                rows.append(
                    {
                        "dataset": ds,
                        "budget": budget,
                        "crossing": kind,
                        "seeds": len(runs),
                        "params": runs[0]["crossing_params"],
                        **{k: {"mean": m, "std": sd} for k, (m, sd) in agg.items()},
                    }
                )
    md = [
        "| dataset | budget | crossing | crossing params | Recall@50 | Recall@100 | val Recall@100 | train ex/s "
        "| tower latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['dataset']} | {r['budget']} | {r['crossing']} | {r['params']:,} | "
            f"{r['recall@50']['mean']:.4f} ± {r['recall@50']['std']:.4f} | "
            f"{r['recall@100']['mean']:.4f} ± {r['recall@100']['std']:.4f} | "
            f"{r['val_recall@100']['mean']:.4f} ± {r['val_recall@100']['std']:.4f} | "
            f"{r['examples_per_s']['mean']:,.0f} | {r['tower_latency_ms']['mean']:.2f} |"
        )
    print("\n".join(md))
    write("crossing", {"rows": rows, "markdown": "\n".join(md), "steps": a.steps, "seeds": a.seeds,
                       "threads": a.threads})


if __name__ == "__main__":
    main()
