"""Pretrained ID embeddings against the model without them, one harness, 3 seeds (TECHNIQUES.md 4).

    python benchmarks/id_pretrain.py [--datasets ml100k_ids,ml100k,synth_small] [--seeds 0,1,2]
                                     [--variants none,finetune,frozen,frozen_overlap] [--refit]
                                     [--set KEY=VALUE ...] [--memory] [--root /tmp/ebr-bench-ids]

Per (dataset, seed): `ebr pretrain-ids` at its defaults (the older data.id_pretrain_fraction of the
training part; ids-only data: a seeded 70% of each user's training pairs) and, for the overlap
ablation, the same on the whole training part (--window train). Variants: none (today's model,
every training example), none_recent (no IDs, the recent window only: what the window alone
does), finetune and frozen (model.id_embeddings, the recent window, the
non-overlapping snapshot) and frozen_overlap (frozen, the whole-window snapshot, --allow-overlap).
Peers (popularity, ALS) are evaluated with the none variant. Without --refit the selected
checkpoint is served (the quick setting); with it, the default pipeline. --memory adds the
pretraining throughput and peak RSS for 0.2M and 4M ID rows (child processes) to derive the memory
per 1M IDs. Resumable: each finished cell keeps its eval JSON under --root. Writes
benchmarks/results/NAME.json (--name, default id_pretrain; use another --root with other settings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, overrides, run_child, seeded_parser, train_eval, write  # noqa: E402
from quality import prepare  # noqa: E402

from ebr.config import RunConfig  # noqa: E402
from ebr.pretrain import snapshots  # noqa: E402
from ebr.pretrain.ids import pretrain_ids  # noqa: E402

VARIANTS = {
    "none": {},
    "none_recent": {"data.recent_only": True},
    "finetune": {"model.id_embeddings": "finetune"},
    "frozen": {"model.id_embeddings": "frozen"},
    "frozen_overlap": {"model.id_embeddings": "frozen", "train.allow_overlap": True},
}
METRICS = ("recall@20", "recall@50", "recall@100", "hr@100")

MEMORY = r"""
import json, sys, time, numpy as np, torch, torch.nn.functional as F
from ebr.pretrain.ids import _ebc
from ebr.train import distributed
from ebr.train.loss import sampled_softmax_logq
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
def status(key):  # kB from /proc/self/status (ru_maxrss survives exec on Linux: the parent's peak)
    return int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1])
n, B, steps = int(sys.argv[1]), 1024, 60
ranks = distributed.setup(need_group=True)
base = status("VmRSS:")
m = _ebc(n, n, 64, 0.05, "table_wise", ranks)
g = torch.Generator().manual_seed(0)
t0 = None
for step in range(steps):
    if step == 10:
        t0 = time.time()
    u, p, q = (torch.randint(0, n, (B,), generator=g) for _ in range(3))
    d = m(KeyedJaggedTensor.from_lengths_sync(keys=["user", "pin", "neg"], values=torch.cat([u, p, q]),
                                              lengths=torch.ones(3 * B, dtype=torch.int32))).to_dict()
    loss = sampled_softmax_logq(F.normalize(d["user"], dim=-1), F.normalize(d["pin"], dim=-1), p, None, 0.1,
                                neg=F.normalize(d["neg"], dim=-1), neg_ids=q)
    loss.backward()
s = time.time() - t0
print(json.dumps({"id_rows": 2 * n, "examples_per_s": round((steps - 10) * B / s, 1),
                  "ids_per_s": round(3 * (steps - 10) * B / s, 1),
                  "peak_rss_mb": round(status("VmHWM:") / 1024, 1), "rss_before_tables_mb": round(base / 1024, 1)}))
"""


def snapshot(ws, seed: int, whole: bool, sets: dict) -> dict:
    """The (dataset, seed) snapshot, pretrained once (kept in the workspace)."""
    name = f"ids-{'whole-' if whole else ''}{seed}"
    have = [m for m in snapshots.list_snapshots(ws) if m["name"] == name]
    if have:
        return have[0]
    cfg = RunConfig.load(None, {**{k: v for k, v in sets.items() if k.startswith(("pretrain.", "data."))},
                                "train.seed": seed})
    return pretrain_ids(ws, cfg, window="train" if whole else None, name=name, progress=False)


def memory() -> dict:
    rows = [run_child(MEMORY.replace("sys.argv[1]", f"'{n}'")) for n in (100_000, 2_000_000)]
    per_m = (rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / ((rows[1]["id_rows"] - rows[0]["id_rows"]) / 1e6)
    return {"runs": rows, "peak_rss_mb_per_1m_ids": round(per_m, 1),
            "note": "dim 64, batch 1024, one process, table-wise, fused row-wise Adagrad; the table alone is "
                    "256 MB per 1M rows (fp32) plus one Adagrad value per row"}


def main() -> None:
    ap = seeded_parser(__doc__, VARIANTS, "/tmp/ebr-bench-ids")
    ap.set_defaults(datasets="ml100k_ids,ml100k,synth_small")
    ap.add_argument("--memory", action="store_true", help="also measure pretraining memory per 1M IDs")
    ap.add_argument("--name", default="id_pretrain", help="results/NAME.json (variants of the settings)")
    a = ap.parse_args()
    sets = overrides(a.set)
    root = Path(a.root)
    out = {"variants": VARIANTS, "datasets": {}}
    results = Path(__file__).resolve().parent / "results" / f"{a.name}.json"
    if results.exists():  # keep the parts this invocation does not rerun
        old = json.loads(results.read_text())
        out["datasets"], out["memory"] = old.get("datasets", {}), old.get("memory")
    for ds in a.datasets.split(","):
        ws = prepare(ds, root, {})
        seeds = [int(s) for s in a.seeds.split(",")]
        cells: dict[str, list[dict]] = {}
        pre = []
        for seed in seeds:
            snaps = {False: snapshot(ws, seed, False, sets), True: snapshot(ws, seed, True, sets)}
            pre.append({k: snaps[False][k] for k in ("counts", "loss_curve", "throughput", "window_text", "dim")})
            for v in a.variants.split(","):
                over = {**sets, **VARIANTS[v], "train.seed": seed, "train.refit": a.refit}
                if "none" not in v:
                    over["train.id_snapshot"] = snaps[v == "frozen_overlap"]["name"]
                res = train_eval(ws, f"{v}-{seed}", over, root / f"{ds}-ids-{v}-{seed}.json",
                                 peers=("popularity", "als") if v == "none" else ())
                for r in res["results"]:
                    own = r["name"] == "two_tower"  # the peers have no validation or training examples
                    cells.setdefault(v if own else r["name"], []).append(
                        {**{m: r[m] for m in METRICS}, **({"val_recall@100": res["train"]["best_val_recall@100"],
                                                           "train_examples": res["train"]["train_examples"]}
                                                          if own else {})})
                print(ds, v, seed, {r["name"]: round(r["recall@50"], 4) for r in res["results"]}, flush=True)
        rows = {name: {m: mean_std([c[m] for c in cs]) for m in cs[0]} for name, cs in cells.items()}
        als = rows.get("als", {}).get("recall@50", {}).get("mean")
        for r in rows.values():
            r["x_als_recall@50"] = round(r["recall@50"]["mean"] / als, 3) if als else None
        out["datasets"][ds] = {"protocol": res["protocol"], "n_users": res["n_users"], "seeds": seeds, "rows": rows,
                               "pretraining": pre, "settings": {"refit": a.refit, "set": sets}}
    if a.memory:
        out["memory"] = memory()
    lines = ["| dataset | model | recall@50 | × ALS | recall@100 | hr@100 | val recall@100 | train examples |",
             "|---|---|---|---|---|---|---|---|"]
    for ds, t in out["datasets"].items():
        for name, r in t["rows"].items():
            lines.append(f"| {ds} ({t['protocol']}, {t['n_users']:,} users) | {name} | "
                         f"{r['recall@50']['mean']:.4f} ± {r['recall@50']['std']:.4f} | {r['x_als_recall@50']} | "
                         f"{r['recall@100']['mean']:.4f} ± {r['recall@100']['std']:.4f} | "
                         f"{r['hr@100']['mean']:.4f} ± {r['hr@100']['std']:.4f} | " + (
                             f"{r['val_recall@100']['mean']:.4f} ± {r['val_recall@100']['std']:.4f} | "
                             f"{int(r['train_examples']['mean']):,} |" if "train_examples" in r else "n/a | n/a |"))
    out["markdown"] = "\n".join(lines)
    write(a.name, out)
    print(out["markdown"])


if __name__ == "__main__":
    main()
