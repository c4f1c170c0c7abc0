"""Conditional retrieval against its baselines, one harness, 3 seeds (TECHNIQUES.md 7).

    python benchmarks/conditional.py [--datasets synth_small,ml100k] [--seeds 0,1,2]
                                     [--variants plain,conditional_logged,conditional_target]
                                     [--set KEY=VALUE ...] [--root /tmp/ebr-bench-conditional]

Variants: plain (today's model, model.conditional false: the "plain two-tower with the same
interest filter" baseline), conditional_logged (train.condition_source logged: the engagement's
logged source interest, else one of the target's interests) and conditional_target (always one
of the target's interests). ML-100K logs no source interest, so there the two conditional variants
are the same model and only conditional_target runs. Every run is evaluated by `ebr eval` with the
conditional block (eval/conditional.py): filtered HR@100 / Recall@100 per (user, interest), the
topic match of the unfiltered top 100, long-tail interests apart, and the interest's popular pins
(interest-popular) as the token-based baseline; the main protocol's HR@100 shows what conditioning
costs the implicit embedding. Without --refit the selected checkpoint is served. Resumable: each
finished (dataset, variant, seed) keeps its eval JSON under --root. Writes
benchmarks/results/conditional.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, overrides, seeded_parser, train_eval, write  # noqa: E402
from quality import prepare  # noqa: E402

VARIANTS = {
    "plain": {},
    "conditional_logged": {"model.conditional": True, "train.condition_source": "logged"},
    "conditional_target": {"model.conditional": True, "train.condition_source": "target"},
}
METRICS = ("filtered_hr@100", "filtered_recall@100", "topic_match@100", "longtail_filtered_hr@100",
           "longtail_filtered_recall@100", "hr@100")


def main() -> None:
    a = seeded_parser(__doc__, VARIANTS, "/tmp/ebr-bench-conditional").parse_args()
    sets = overrides(a.set)
    root = Path(a.root)
    rows = []
    for ds in a.datasets.split(","):
        ws = prepare(ds, root, {})
        for v in a.variants.split(","):
            if ds.startswith("ml100k") and v == "conditional_logged":
                continue  # nothing logged: the same model as conditional_target
            runs = []
            for seed in [int(s) for s in a.seeds.split(",")]:
                over = {**sets, **VARIANTS[v], "train.seed": seed, "train.refit": a.refit}
                run = "single" if v == "plain" else v  # plain: the multi-embedding benchmark's run, when present
                res = train_eval(ws, f"{run}-{seed}", over, root / f"{ds}-cond-{v}-{seed}.json",
                                 peers=(), conditional=True)
                runs.append(res)
                c = {x["name"]: round(x["filtered_hr@100"], 4) for x in res["conditional"]["results"]}
                print(ds, v, seed, "filtered hr@100", c, flush=True)
            names = ["conditional"] if v != "plain" else ["two_tower", "interest_popular"]
            for name in names:
                vals = {}
                for m in METRICS:
                    if m == "hr@100":
                        x = [next(r for r in run["results"] if r["name"] == "two_tower")[m] for run in runs]
                    else:
                        x = [next(r for r in run["conditional"]["results"] if r["name"] == name).get(m, np.nan)
                             for run in runs]
                    vals[m] = mean_std(x)
                label = {"two_tower": "plain two-tower + filter", "interest_popular": "interest-popular"}.get(name, v)
                rows.append({"dataset": ds, "model": label, "seeds": len(runs),
                             "pairs": runs[0]["conditional"]["n_pairs"],
                             "conditions_from": runs[0]["conditional"]["conditions_from"], **vals})
    md = ["| dataset | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        cells = ["n/a" if (r["model"] == "interest-popular" and m in ("topic_match@100", "hr@100"))
                 else f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS]
        md.append(f"| {r['dataset']} | {r['model']} | " + " | ".join(cells) + " |")
    print("\n".join(md))
    write("conditional", {"rows": rows, "markdown": "\n".join(md), "seeds": a.seeds, "refit": a.refit, "set": sets})


if __name__ == "__main__":
    main()
