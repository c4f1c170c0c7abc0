"""Multi-embedding retrieval against its baselines and ablations, one harness, 3 seeds.

    python benchmarks/multi_embedding.py [--datasets synth_small,ml100k] [--seeds 0,1,2]
                                         [--variants single,capsule,...] [--steps N] [--refit]
                                         [--set KEY=VALUE ...]
                                         [--root /tmp/ebr-bench-multi]

Variants: single (today's model), capsule (KDD'25 clustering: maxmin init, single assignment),
mind (random init, soft routing), self_attention (ComiRec-SA), and the capsule's ablations
capsule_random_init (maxmin off) and capsule_soft (single assignment off). Every variant trains with
the same config otherwise; --steps N fixes the step budget (no early stopping), and without --refit
the selected checkpoint is served (the refit doubles the time and changes nothing between variants).

Reported per variant (mean ± sample std over seeds): two_tower = each pin scored by its best
embedding of the user (K by the serving rule), two_tower_served = the round-robin merged list the
service returns (multi variants only); HR@100, Recall@50/100, interest coverage@100 and intra-list
diversity@100; the interest feed as a reference. Resumable: each finished (dataset, variant, seed)
keeps its eval JSON under --root. Writes benchmarks/results/multi_embedding.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, overrides, seeded_parser, train_eval, write  # noqa: E402
from quality import prepare  # noqa: E402

VARIANTS = {
    "single": {},
    "capsule": {"model.user_embeddings": "capsule"},
    "mind": {"model.user_embeddings": "mind"},
    "self_attention": {"model.user_embeddings": "self_attention"},
    "capsule_random_init": {"model.user_embeddings": "capsule", "model.multi.init": "random"},
    "capsule_soft": {"model.user_embeddings": "capsule", "model.multi.assignment": "soft"},
}
METRICS = ("hr@100", "recall@50", "recall@100", "coverage@100", "diversity@100")


def main() -> None:
    ap = seeded_parser(__doc__, VARIANTS, "/tmp/ebr-bench-multi")
    ap.add_argument("--steps", type=int, default=None, help="fixed step budget per run (default: early stopping)")
    a = ap.parse_args()
    sets = overrides(a.set)
    root = Path(a.root)
    rows = []
    for ds in a.datasets.split(","):
        ws = prepare(ds, root, {})
        split = "leave_last_out" if ds == "ml100k_llo" else None
        for v in a.variants.split(","):
            runs = []
            for seed in [int(s) for s in a.seeds.split(",")]:
                over = {**sets, **VARIANTS[v], "train.seed": seed, "train.refit": a.refit,
                        **({"data.split": split} if split else {})}
                if a.steps:
                    over.update({"train.max_steps": a.steps, "train.epochs": 1000, "train.patience": 1000})
                runs.append(train_eval(ws, f"{v}-{seed}", over, root / f"{ds}-{v}-{seed}.json", split,
                                       peers=("interest_popular",)))
                print(ds, v, seed, {r["name"]: round(r["hr@100"], 4) for r in runs[-1]["results"]}, flush=True)
            for name in [r["name"] for r in runs[0]["results"]]:
                if name == "interest_popular" and v != "single":
                    continue
                vals = {m: [next(x for x in run["results"] if x["name"] == name)[m] for run in runs] for m in METRICS}
                rows.append({"dataset": ds, "variant": v if name != "interest_popular" else "interest feed",
                             "list": name, "seeds": len(runs),
                             "train_seconds": float(np.mean([run["train"]["train_seconds"] for run in runs])),
                             **{m: mean_std(x) for m, x in vals.items()}})
    md = ["| dataset | variant | list | " + " | ".join(METRICS) + " | train s |",
          "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in rows:
        md.append(f"| {r['dataset']} | {r['variant']} | {r['list']} | "
                  + " | ".join(f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS)
                  + f" | {r['train_seconds']:.0f} |")
    print("\n".join(md))
    write("multi_embedding", {"rows": rows, "markdown": "\n".join(md), "seeds": a.seeds, "steps": a.steps,
                              "refit": a.refit, "set": sets})


if __name__ == "__main__":
    main()
