"""Validation-only sweep for the defaults: each variant trained without the refit on each dataset,
with the same training seeds (so variants are compared seed by seed), and read by the selection
phase's best validation recall@100 (`summary.json`). Test data is never evaluated here: this is
how a default is chosen without looking at the numbers the quality table reports.

    python benchmarks/val_sweep.py [--datasets ml100k_ids,ml100k_llo,ml100k] [--seeds 0,1,2]
                                   [--variants base,mixneg_1024,...] [--threads 1]
                                   [--data-root /tmp/ebr-bench-quality] [--root /tmp/ebr-bench-val-sweep]
                                   [--name val_sweep] [--no-train]

Datasets are benchmarks/quality.py's (prepared under --data-root, shared with it). Per variant and
dataset: mean ± sample std (ddof 1) over seeds, and the paired difference to `base` (mean ± std of
the per-seed differences): a variant "helps" where that difference is beyond its own spread.
Resumable: a finished (variant, dataset, seed) keeps its summary under --root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402
from quality import prepare  # noqa: E402

from ebr.config import NO_CHOICE, RunConfig  # noqa: E402
from ebr.train.loop import train  # noqa: E402

VARIANTS = {  # name: config overrides on top of the defaults and NO_CHOICE (each trained as given)
    "base": {},
    "user_gap_off": {"features.user_gap": "off"},
    "user_gap_on": {"features.user_gap": "on"},
    "mixneg_1024": {"train.mixed_negatives": 1024},
    "mixneg_2048": {"train.mixed_negatives": 2048},
    "dropout_0.2": {"model.dropout": 0.2},
    "dropout_0.4": {"model.dropout": 0.4},
    "mixneg_1024_dropout_0.2": {"train.mixed_negatives": 1024, "model.dropout": 0.2},
    "mixneg_1024_dropout_0.4": {"train.mixed_negatives": 1024, "model.dropout": 0.4},
    "temperature_0.1": {"model.temperature": 0.1},
    "history_100": {"features.history_len": 100},
    "lr_1e-3": {"train.lr": 1e-3},
    "weight_decay_1e-4": {"train.weight_decay": 1e-4},
    "user_id": {"model.use_user_id": True},
    "horizon_4": {"train.horizon": 4},
    "horizon_16": {"train.horizon": 16},
    "horizon_64": {"train.horizon": 64},
    "pin_id_min_count_5": {"model.pin_id_min_count": 5},
    "pin_id_min_count_20": {"model.pin_id_min_count": 20},
    "pin_id_dropout_0.5": {"model.pin_id_dropout": 0.5},
    "pin_id_dropout_0.8": {"model.pin_id_dropout": 0.8},
    "no_pin_id": {"model.use_pin_id": False},
    **{f"recency_{h}": {"train.recency_half_life_days": float(h)} for h in (3, 7, 14, 30, 60)},
    **{f"no_pin_id_recency_{h}": {"model.use_pin_id": False, "train.recency_half_life_days": float(h)}
       for h in (7, 14, 30)},
    # around mixneg_1024_dropout_0.2 (md)
    "md_user_id": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.use_user_id": True},
    "md_lr_1e-3": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "train.lr": 1e-3},
    "md_id_dim_64": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.id_dim": 64},
    "md_batch_256": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "train.batch_size": 256},
    "md_temperature_0.07": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.temperature": 0.07},
    "md_temperature_0.035": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.temperature": 0.035},
    "md_hidden_512": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.hidden": [512]},
    "md_hidden_256x2": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.hidden": [256, 256]},
    "md_linear": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.hidden": []},
    "md_dim_128": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "model.dim": 128},
    "md_horizon_16": {"train.mixed_negatives": 1024, "model.dropout": 0.2, "train.horizon": 16},
    # data without time: the file-order prefix as each example's history, with the earlier epoch
    # cap (the defaults before features.history_as_of auto and train.min_steps)
    "prefix_histories": {"features.history_as_of": "example", "train.epochs": 8, "train.stop_after_steps": 0},
    "history_dropout_0.5": {"train.history_dropout": 0.5},
    "input_norm_none": {"model.input_norm": "none"},
    # the time term (pin age, recent counts read at one as-of time by the index)
    "no_time_term": {"features.pin_age": False, "features.pin_counts": False},
    "no_age": {"features.pin_age": False},
    "no_counts": {"features.pin_counts": False},
    "lr_5e-4": {"train.lr": 5e-4},
    "time_dim_32": {"model.time_dim": 32},
    "mask_same_user": {"train.mask_same_user": True},
    "user_weight_0.5": {"train.user_weight_power": 0.5},
    "user_weight_1": {"train.user_weight_power": 1.0},
    "lr_plateau_0.3": {"train.lr_plateau_factor": 0.3},
    "lr_plateau_0.5": {"train.lr_plateau_factor": 0.5},
    "end_histories": {"features.history_as_of": "end"},
    "pin_bias": {"model.pin_bias": True},
    "time_prior": {"model.time_prior": True},
    **{f"first_day_{w}": {"train.first_day_weight": w} for w in (0.1, 0.3)},
    "history_position": {"model.history_position": "on"},
    "no_history_position": {"model.history_position": "off"},
    # data without time whose lines are in engagement order (validation: each user's last rows)
    "example_histories": {"features.history_as_of": "example"},
    "example_histories_position": {"features.history_as_of": "example", "model.history_position": "on"},
}


def sd(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def split_of(ds: str) -> str | None:
    return "leave_last_out" if ds == "ml100k_llo" else None


def peers_on_validation(ws, seed: int, split: str | None) -> dict[str, float]:
    """The peers' recall@100 on the validation targets the model is selected on (the same users,
    exclusions and candidates as `validation_recalls`, TRAIN visible only): where the model stands
    against them without reading test."""
    from ebr.data.splits import Part, load_split
    from ebr.eval import peers as pz
    from ebr.eval.evaluate import _rank_all
    from ebr.features.examples import load_engagements
    from ebr.ranking import metrics_at_k
    from ebr.train.loop import VAL_K, prepare

    cfg = RunConfig.load(None, {"train.seed": seed, **({"data.split": split} if split else {})})
    d = prepare(ws, cfg)
    e = load_engagements(ws, d.fs, load_split(ws, cfg.data.split), seed=seed,
                         given_validation_mode=cfg.data.given_validation)
    visible = e.part == Part.TRAIN
    P, allowed = d.sizes["n_pins"], torch.from_numpy(d.candidates)
    scorers = {"popularity": pz.popularity(e, visible, P),
               "als": pz.als(e, visible, len(d.fs.users), P, cfg.features.action_weights, seed=seed)}
    out = {}
    for name, fn in scorers.items():
        top = _rank_all(fn, d.val.users, d.val.exclude, VAL_K, allowed)
        out[name] = metrics_at_k(top, d.val.targets, [VAL_K])[f"recall@{VAL_K}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ml100k_ids,ml100k_llo,ml100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="base,mixneg_1024,dropout_0.2,mixneg_1024_dropout_0.2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ap.add_argument("--data-root", default="/tmp/ebr-bench-quality", help="where quality.py's workspaces live")
    ap.add_argument("--root", default="/tmp/ebr-bench-val-sweep")
    ap.add_argument("--name", default="val_sweep", help="results/NAME.json")
    ap.add_argument("--no-train", action="store_true",
                    help="report the finished cells only (a variant missing a seed on a dataset is left out there)")
    a = ap.parse_args()
    names = a.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; available: {', '.join(VARIANTS)}")
    if "base" not in names:
        names.insert(0, "base")
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    marker, data_root = root / "data_root.txt", str(Path(a.data_root).resolve())
    if marker.exists() and marker.read_text() != data_root:  # cells trained on other workspaces
        ap.error(f"{root} holds cells trained on the workspaces under {marker.read_text()}, not {data_root}: "
                 "pass that --data-root, or another --root")
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(data_root)
    os.replace(tmp, marker)
    seeds = [int(s) for s in a.seeds.split(",")]
    table: dict[str, dict] = {}
    for ds in a.datasets.split(","):
        ws = prepare(ds, Path(a.data_root), {})
        vals: dict[str, list[float]] = {}
        for name in names:
            if a.no_train and not all((root / f"{name}-{ds}-{seed}.json").exists() for seed in seeds):
                if name == "base":
                    ap.error(f"--no-train: base has no finished cells for {ds} at seeds {a.seeds} under {root}")
                continue
            vals[name] = []
            for seed in seeds:
                out = root / f"{name}-{ds}-{seed}.json"
                if not out.exists():
                    over = {"train.seed": seed, "train.refit": False, "train.threads": a.threads, **NO_CHOICE,
                            **VARIANTS[name], **({"data.split": split_of(ds)} if split_of(ds) else {})}
                    s = train(ws, RunConfig.load(None, over), run=f"sweep-{name}-seed{seed}", progress=False)
                    tmp = out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(s))
                    os.replace(tmp, out)
                vals[name].append(json.loads(out.read_text())["best_val_recall@100"])
                print(f"{ds} {name} seed {seed}: val recall@100 {vals[name][-1]:.4f}", flush=True)
        peers: dict[str, list[float]] = {}
        for seed in seeds:  # the peers on the same validation targets (each seed draws its own given split)
            out = root / f"peers-{ds}-{seed}.json"
            if not out.exists():
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(peers_on_validation(ws, seed, split_of(ds))))
                os.replace(tmp, out)
            for k, x in json.loads(out.read_text()).items():
                peers.setdefault(k, []).append(x)
        table[ds] = {f"peer: {k}": {"val_recall@100": v, "mean": float(np.mean(v)), "std": sd(v)}
                     for k, v in peers.items()}
        for name, v in vals.items():
            diff = np.array(v) - np.array(vals["base"])
            table[ds][name] = {"val_recall@100": v, "mean": float(np.mean(v)), "std": sd(v),
                               "diff_mean": float(diff.mean()), "diff_std": sd(diff)}
    lines = ["| dataset | variant | val recall@100 | paired difference to base |", "|---|---|---|---|"]
    for ds, rows in table.items():
        for name, r in rows.items():
            lines.append(f"| {ds} | {name} | {r['mean']:.4f} ± {r['std']:.4f} | "
                         + ("–" if "diff_mean" not in r or name == "base" else
                            f"{r['diff_mean']:+.4f} ± {r['diff_std']:.4f}") + " |")
    md = "\n".join(lines)
    print(md)
    ran = [n for n in names if any(n in rows for rows in table.values())]  # --no-train leaves some out
    write(a.name, {"table": table, "markdown": md, "seeds": a.seeds, "variants": ran,
                   "overrides": {n: VARIANTS[n] for n in ran}})


if __name__ == "__main__":
    main()
