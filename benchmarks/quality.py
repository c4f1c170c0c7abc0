"""Quality: dataset x model table, the two-tower model against the peers in one harness,
3 training seeds, mean +- std.

    python benchmarks/quality.py [--datasets synth_small,ml100k] [--seeds 0,1,2] [--epochs N]
                                 [--set KEY=VALUE ...] [--name quality]
                                 [--adjacency NAME:TRAIN:TEST ...] [--root /tmp/ebr-bench-quality] [--keep-others]

--set overrides a config field of the two-tower model (e.g. --set train.logq=false); --name names the
variant (its results file and its cached runs). Spreads are sample std (ddof 1).

Datasets: synth_small (the synthetic world, seed 0), ml100k (../shared/data/ml-100k, temporal
split), ml100k_llo (the same, leave-last-out: about 940 users instead of about 100), ml100k_ids
(the same ratings as an ids-only dataset: no features, no timestamps, each user's last 20% as the
given test split), ml100k_ids_random (the same with a seeded random 20% of each user's ratings as
test and each line's items in id order, as public ids-only sets such as LightGCN's are split and
stored), ml100k_nested (the validation-only copy of ml100k: its test window dropped, its
validation window as test, for choosing settings by the whole pipeline's result: nested_ml100k) and
any adjacency split given as NAME:TRAIN_FILE:TEST_FILE (given protocol).
Resumable: a finished (dataset, seed) keeps its eval JSON under --root and is not rerun.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write  # noqa: E402

from ebr.config import RunConfig  # noqa: E402
from ebr.eval.evaluate import evaluate  # noqa: E402
from ebr.train.loop import train  # noqa: E402
from ebr.workspace import Workspace  # noqa: E402

ML100K = Path(os.environ.get("EBR_ML100K", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))
METRICS = ("recall@20", "recall@50", "recall@100", "recall@500", "ndcg@100", "hr@100")


def ids_only_ml100k(folder: Path, test_share: float = 0.2, random_split: bool = False) -> tuple[Path, Path]:
    """ML-100K with every feature and timestamp dropped: adjacency files (`user item item ...`),
    each user's ratings in time order, the last 20% of them (at least one) in the test file; with
    `random_split`, a seeded random 20% of them (seed 0), each line's items in id order. The given
    protocol then reads it like any ids-only dataset (no time term, no features)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted((int(u), int(ts), int(i)) for u, i, _, ts in
                  (ln.split("\t") for ln in (ML100K / "u.data").read_text().splitlines() if ln.strip()))
    by_user: dict[int, list[int]] = {}
    for u, _, i in rows:
        by_user.setdefault(u, []).append(i)
    train, test = [], []
    rng = np.random.default_rng(0)
    for u, items in by_user.items():
        n_test = max(1, round(len(items) * test_share))
        if random_split:
            held = set(rng.choice(len(items), n_test, replace=False).tolist())
            tr, te = sorted(x for j, x in enumerate(items) if j not in held), sorted(items[j] for j in held)
        else:
            tr, te = items[:-n_test], items[-n_test:]
        train.append(" ".join(map(str, [u, *tr])))
        test.append(" ".join(map(str, [u, *te])))
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "test.txt").write_text("\n".join(test) + "\n")
    return folder / "train.txt", folder / "test.txt"


def nested_ml100k(base: Workspace, folder: Path) -> tuple[dt.datetime, dt.datetime]:
    """The validation-only copy of the temporal ML-100K benchmark: ML-100K's files with every
    rating at or after the temporal split's cut dropped (u.data filtered; u.item, u.user, u.genre and
    u.occupation as they are; none of the download's u1-u5/ua/ub split files, which hold test-window
    ratings), so that its test window is never read; returns (cut, val_cut). Split at val_cut, the copy's
    test is the benchmark's validation window and its validation a window carved from before: the
    whole pipeline (choice, selection, refit, evaluation against the peers) can be compared between
    settings without the test numbers the quality table reports."""
    from ebr.data.splits import load_split

    m = load_split(base).manifest
    cut, val_cut = dt.datetime.fromisoformat(m["cut"]), dt.datetime.fromisoformat(m["val_cut"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("u.item", "u.user", "u.genre", "u.occupation"):
        if (ML100K / name).is_file():
            (folder / name).write_bytes((ML100K / name).read_bytes())
    kept = [ln for ln in (ML100K / "u.data").read_text().splitlines()
            if ln.strip() and int(ln.split("\t")[3]) < cut.timestamp()]
    (folder / "u.data").write_text("\n".join(kept) + "\n")
    return cut, val_cut


def prepare(name: str, root: Path, adjacency: dict[str, tuple[str, str]]) -> Workspace:
    ws = Workspace.at(root / name)
    if ws.has_table("engagements"):
        return ws
    if name == "synth_small":
        from ebr.data.synth import generate

        generate(ws, "small", seed=0, progress=False)
    elif name in ("ml100k", "ml100k_llo"):
        from ebr.data.importers import import_movielens
        from ebr.data.splits import make_leave_last_out

        import_movielens(ws, ML100K)
        if name == "ml100k_llo":
            make_leave_last_out(ws, "leave_last_out")
    elif name == "ml100k_nested":
        from ebr.data.importers import import_movielens
        from ebr.data.splits import load_split, make_temporal

        cut, val_cut = nested_ml100k(prepare("ml100k", root, adjacency), root / f"{name}_files")
        import_movielens(ws, root / f"{name}_files")
        make_temporal(ws, "temporal", cut=val_cut)
        if dt.datetime.fromisoformat(load_split(ws).manifest["data_range"][1]) >= cut:  # (not an assert: -O)
            raise SystemExit(f"{name}: a rating at or after the test cut {cut} was imported")
    elif name in ("ml100k_ids", "ml100k_ids_random"):
        from ebr.data.importers import import_adjacency

        tr, te = ids_only_ml100k(root / f"{name}_files", random_split=name == "ml100k_ids_random")
        import_adjacency(ws, tr, te)
    elif name in adjacency:
        from ebr.data.importers import import_adjacency

        tr, te = adjacency[name]
        import_adjacency(ws, Path(tr), Path(te))
    else:
        raise SystemExit(f"unknown dataset {name!r}")
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="synth_small,ml100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--config", default=None, help="YAML run config for the two-tower model")
    ap.add_argument("--adjacency", action="append", default=[], metavar="NAME:TRAIN:TEST")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    ap.add_argument("--name", default="quality", help="variant name: results/NAME.json")
    ap.add_argument("--root", default="/tmp/ebr-bench-quality")
    ap.add_argument("--no-write", action="store_true", help="leave benchmarks/results alone (ablation variants)")
    ap.add_argument("--keep-others", action="store_true",
                    help="carry the datasets of results/NAME.json not run now into the new file (marked "
                         "carried_over: a row whose code path did not change need not be rerun)")
    a = ap.parse_args()
    import yaml

    sets = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.set)}
    adjacency = {x.split(":")[0]: tuple(x.split(":")[1:3]) for x in a.adjacency}
    datasets = [d for d in a.datasets.split(",") if d] + list(adjacency)
    root = Path(a.root)
    table: dict[str, dict] = {}
    for ds in datasets:
        ws = prepare(ds, root, adjacency)
        runs = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = root / f"{a.name}-{ds}-seed{seed}.json"
            if not out.exists():
                over = {"train.seed": seed, **({"train.epochs": a.epochs} if a.epochs else {}), **sets,
                        **({"data.split": "leave_last_out"} if ds == "ml100k_llo" else {})}
                cfg = RunConfig.load(a.config, over)
                run = f"{a.name}-seed{seed}"
                summary = train(ws, cfg, run=run, progress=False)
                res = evaluate(ws, run, "leave_last_out" if ds == "ml100k_llo" else None, progress=False)
                res["train"] = summary
                out.write_text(json.dumps(res))
            runs.append(json.loads(out.read_text()))
            print(f"{ds} seed {seed}: " + ", ".join(f"{r['name']} {r['recall@100']:.4f}" for r in runs[-1]["results"]),
                  flush=True)
        models = {}
        for r in runs[0]["results"]:
            vals = {m: [next(x for x in run["results"] if x["name"] == r["name"])[m] for run in runs] for m in METRICS}
            models[r["name"]] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                                 for m, v in vals.items()}
        table[ds] = {"protocol": runs[0]["protocol"], "n_users": runs[0]["n_users"],
                     "unreachable_target_share": runs[0].get("unreachable_target_share"),
                     "n_cold_users": runs[0]["n_cold_users"], "seeds": len(runs), "models": models,
                     "train_seconds": [run["train"]["train_seconds"] for run in runs],
                     "chosen": [run["train"].get("choice", {}).get("chosen") for run in runs]}
    old_file = RESULTS / f"{a.name}.json"
    if a.keep_others and old_file.exists():
        old = json.loads(old_file.read_text())["table"]
        # the old file's order, each rerun row in its place, new datasets last
        table = {**{ds: table.get(ds, {**t, "carried_over": True}) for ds, t in old.items()}, **table}
    lines = ["| dataset | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for ds, t in table.items():
        for name, m in t["models"].items():
            lines.append(f"| {ds} ({t['protocol']}, {t['n_users']:,} users) | {name} | "
                         + " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in METRICS) + " |")
    md = "\n".join(lines)
    print(md)
    (root / f"{a.name}-table.json").write_text(json.dumps(table))
    if not a.no_write:
        write(a.name, {"table": table, "markdown": md, "seeds": a.seeds, "epochs": a.epochs, "config": a.config,
                       "set": sets})


if __name__ == "__main__":
    main()
