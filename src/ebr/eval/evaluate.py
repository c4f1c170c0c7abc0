"""`ebr eval`: the protocols and counting rules of EVALUATION.md, with the two-tower model
scored through the same Retriever the service uses (over the run's exact bundle), and the peers
counted identically: same users, same targets, same exclusions, same candidates."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebr.config import FeaturesConfig
from ebr.data.splits import Part, Split, load_split
from ebr.errors import EbrError
from ebr.features.examples import eval_spec
from ebr.features.snapshot import build_snapshot
from ebr.index.bundle import build_bundle, find_bundle
from ebr.log import bars_enabled, log
from ebr.ranking import max_over_embeddings, metrics_at_k, topk_masked
from ebr.serve.retriever import Retriever
from ebr.workspace import Workspace, write_json

PEERS = ("popularity", "interest_popular", "als")


def _rank_all(score: Callable[[np.ndarray], torch.Tensor], users: np.ndarray, exclude, k: int,
              allowed: torch.Tensor, batch: int = 256) -> np.ndarray:
    out = []
    for lo in range(0, len(users), batch):
        s = score(users[lo: lo + batch])
        out.append(topk_masked(s, k, exclude[lo: lo + batch], allowed)[1].numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def _sampled(score: Callable[[np.ndarray], torch.Tensor], cands: list[tuple[int, np.ndarray]], ks: list[int]) -> dict:
    """Each target ranked among its given candidates (target first in the row): HR@K, NDCG@K.
    Ties count at the mid-rank (half of the tied candidates above the target): a constant scorer
    ranks every target in the middle, as random tie-breaking would on average."""
    res: dict[str, list[float]] = {}
    users = np.array([u for u, _ in cands])
    for lo in range(0, len(cands), 256):
        s = score(users[lo: lo + 256])
        for row, (_, pins) in zip(s, cands[lo: lo + 256]):
            sc = row[torch.from_numpy(pins)]
            rank = float((sc[1:] > sc[0]).sum()) + 0.5 * float((sc[1:] == sc[0]).sum())
            for k in ks:
                res.setdefault(f"hr@{k}", []).append(float(rank < k))
                res.setdefault(f"ndcg@{k}", []).append(1.0 / np.log2(rank + 2) if rank < k else 0.0)
    return {k: float(np.mean(v)) for k, v in res.items()}


def read_candidates(path: Path, r: Retriever) -> list[tuple[int, np.ndarray]]:
    """Lines 'user target cand cand ...' -> (user code, pin codes with the target first)."""
    out = []
    for ln in Path(path).read_text().splitlines():
        parts = ln.split()
        if len(parts) < 3:
            continue
        out.append((int(r.user_codes([parts[0]])[0]), r.pin_codes(parts[1:])))
    return out


def check_bundle_for_split(manifest: dict[str, Any], sp: Split) -> None:
    """A bundle may be evaluated on a split only if its state ends before the split's test part."""
    if manifest.get("split") == sp.name:
        return
    cut = sp.cut
    if sp.kind == "temporal" and cut is not None and manifest.get("as_of_us", 0) < int(cut.timestamp() * 1e6):
        return
    raise EbrError(f"bundle {manifest.get('version')} was built as of split {manifest.get('split')!r}, which can "
                   f"see split {sp.name!r}'s test part; build one for it: ebr index build --split {sp.name} "
                   "--backend ...")


def evaluate(ws: Workspace, run: str = "main", split: str | None = None, peers: tuple[str, ...] = PEERS,
             ks: tuple[int, ...] = (20, 50, 100, 500), candidates: Path | None = None, progress: bool = True,
             max_users: int | None = None, corpus: str | None = None, bundle: Path | None = None,
             conditional: bool | None = None) -> dict[str, Any]:
    """Evaluate a run against peers. Returns the EVALUATION.md JSON object. By default the run's
    exact bundle as of the split's cut; `bundle` measures another (e.g. HNSW or IVF-PQ) instead.
    `conditional` adds the per-(user, interest) block (eval/conditional.py); default: when the
    bundle serves mode conditional."""
    t0 = time.time()
    sp = load_split(ws, split)
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise EbrError(f"unknown peer(s) {', '.join(sorted(unknown))}; available: {', '.join(PEERS)}")
    if bundle is None:
        bundle = find_bundle(ws, run, sp.name) or build_bundle(ws, run, sp.name)
    r = Retriever(bundle)
    check_bundle_for_split(r.manifest, sp)
    cfg = r.manifest["config"]
    fcfg = FeaturesConfig.model_validate(cfg["features"])
    # the same features snapshot as the bundle's: the peers read what the model's state reads
    snap = build_snapshot(ws, r.fs, sp, fcfg, cfg["train"]["seed"], (Part.TRAIN, Part.VALIDATION))
    e, visible = snap.e, snap.visible
    spec = eval_spec(e, fcfg, target_part=Part.TEST, train_parts=(Part.TRAIN, Part.VALIDATION), max_users=max_users)
    K = max(ks)
    P = len(r.pin_ids)
    allowed = r.candidate
    corpus_name = "all pins"
    if corpus:
        import pyarrow.parquet as pq

        from ebr.corpus.build import resolve

        cdir = resolve(ws, corpus)
        in_corpus = torch.zeros_like(allowed)
        in_corpus[torch.from_numpy(r.pin_codes(pq.read_table(cdir / "corpus.parquet")["pin_id"].to_pylist()))] = True
        allowed = allowed & in_corpus
        corpus_name = f"corpus {cdir.name} ({int(allowed.sum()):,} pins)"
    scorers: dict[str, Callable[[np.ndarray], torch.Tensor]] = {}
    from ebr.eval import peers as pz

    if "popularity" in peers:
        scorers["popularity"] = pz.popularity(e, visible, P)
    if "interest_popular" in peers:
        scorers["interest_popular"] = pz.interest_popular(e, visible, P, r.pin_interests, snap.users,
                                                          len(r.fs.interests))
    if "als" in peers:
        if progress:
            log.info("fitting ALS on %s visible engagements", f"{int(visible.sum()):,}")
        scorers["als"] = pz.als(e, visible, len(r.fs.users), P, fcfg.action_weights, seed=cfg["train"]["seed"],
                                progress=bars_enabled(progress))

    # targets on pins that do not exist at the as-of time (first engaged later) are unreachable for all
    n_targets = sum(len(t) for t in spec.targets)
    unreachable = sum(int((~allowed.numpy()[t]).sum()) for t in spec.targets) / max(n_targets, 1)
    results = []
    # the two-tower model through the Retriever (the serving path), exclusions as the protocol says;
    # a multi-embedding model: two_tower = each pin scored by its best embedding (K by the serving
    # rule), two_tower_served = the round-robin merged list the service returns
    only = np.flatnonzero(allowed.numpy()) if corpus else None
    multi = "multi" in r.manifest["modes"]
    _, top = r.retrieve_codes(spec.users, K, exclude=spec.exclude, allowed=only,
                              mode="multi" if multi else "single", merge="max")
    plain_top = top
    results.append({"name": "two_tower", **metrics_at_k(top, spec.targets, ks, r.pin_interests)})
    if multi:
        _, top = r.retrieve_codes(spec.users, K, exclude=spec.exclude, allowed=only, mode="multi")
        results.append({"name": "two_tower_served", **metrics_at_k(top, spec.targets, ks, r.pin_interests)})
    for name, fn in scorers.items():
        top = _rank_all(fn, spec.users, spec.exclude, K, allowed)
        results.append({"name": name, **metrics_at_k(top, spec.targets, ks, r.pin_interests)})
    # cold users: the Retriever's cold-start path (no history: popular pins)
    cold = []
    if len(spec.cold_users):
        tops = []
        for u in spec.cold_users.tolist():
            res = r.retrieve(r.fs.users.decode([u])[0], K)
            codes = r.pin_codes(res.pin_ids)
            tops.append(np.pad(codes, (0, K - len(codes)), constant_values=-1))
        cold.append({"name": "two_tower", **metrics_at_k(np.array(tops), spec.cold_targets, ks, r.pin_interests)})
    out: dict[str, Any] = {
        "dataset": ws.root.name, "protocol": sp.kind, "split": sp.name, "n_users": int(len(spec.users)),
        "n_cold_users": int(len(spec.cold_users)), "results": results, "cold_results": cold,
        "bundle": r.version, "backend": r.backend, "run": run, "candidates": corpus_name,
        "unreachable_target_share": round(unreachable, 6), "seconds": round(time.time() - t0, 2),
    }
    if conditional or (conditional is None and "conditional" in r.manifest["modes"]):
        from ebr.eval.conditional import conditional_metrics

        popular = scorers.get("popularity") or pz.popularity(e, visible, P)
        out["conditional"] = conditional_metrics(r, e, visible, spec, plain_top, popular, ks,
                                                 fcfg.positive_actions, only, "multi" if multi else "single")
        if progress and out["conditional"]:
            log.info(format_conditional(out["conditional"]))
    if candidates:
        cands = read_candidates(candidates, r)

        def tt_score(codes: np.ndarray) -> torch.Tensor:  # multi: the best embedding's score
            qs = r.embed_all(*r.stored_inputs(codes), users=codes)
            return max_over_embeddings(qs.queries, qs.active, r.pin_emb)

        out["protocol"] = sp.kind + "+sampled"
        out["n_users"] = len(cands)
        out["results"] = [{"name": "two_tower", **_sampled(tt_score, cands, list(ks))}] + [
            {"name": n, **_sampled(fn, cands, list(ks))} for n, fn in scorers.items()]
    if progress:
        log.info(format_table(out))
    return out


def format_table(res: dict[str, Any], cols: tuple[str, ...] = ("recall@20", "recall@100", "recall@500", "ndcg@100",
                                                                  "hr@100", "coverage@100")) -> str:
    cols = tuple(c for c in cols if any(c in r for r in res["results"]))
    lines = [
        f"{res['dataset']} / {res['protocol']}: {res['n_users']:,} users ({res['n_cold_users']:,} cold); "
        f"{res.get('backend', 'exact')} bundle; {res.get('unreachable_target_share', 0):.1%} of targets are outside "
        "the candidates (pins born later, or outside the corpus)",
        f"{'model':<18}" + "".join(f"{c:>14}" for c in cols),
    ]
    for r in res["results"]:
        lines.append(f"{r['name']:<18}" + "".join(f"{r.get(c, float('nan')):>14.4f}" for c in cols))
    return "\n".join(lines)


def format_conditional(c: dict[str, Any], k: int = 100) -> str:
    lines = [f"conditional: {c['n_pairs']:,} (user, interest) pairs over {c['n_interests']} interests "
             f"(conditions from {c['conditions_from'].replace('_', ' ')}; long tail: {c['n_longtail_pairs']:,} pairs)",
             f"{'model':<18}" + "".join(f"{x:>22}" for x in (f"filtered_hr@{k}", f"filtered_recall@{k}",
                                                          f"topic_match@{k}", f"longtail_filtered_hr@{k}"))]
    for r in c["results"]:
        lines.append(f"{r['name']:<18}" + "".join(f"{r.get(x, float('nan')):>22.4f}" for x in (
            f"filtered_hr@{k}", f"filtered_recall@{k}", f"topic_match@{k}", f"longtail_filtered_hr@{k}")))
    return "\n".join(lines)


def write_report(ws: Workspace, res: dict[str, Any], run: str = "main", name: str = "latest") -> Path:
    """reports/NAME/: report.md, metrics.json, recall_at_k.png, training.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = ws.report_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "metrics.json", res)
    ks = sorted(int(k.split("@")[1]) for k in res["results"][0] if k.startswith("recall@"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["results"]:
        ax.plot(ks, [r[f"recall@{k}"] for k in ks], marker="o", label=r["name"])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"{res['dataset']} ({res['protocol']}), {res['n_users']:,} users")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "recall_at_k.png", dpi=110)
    plt.close(fig)
    mpath = ws.run_dir(run) / "metrics.jsonl"
    rows = [__import__("json").loads(x) for x in mpath.read_text().splitlines() if x.strip()] if mpath.exists() else []
    if rows:
        fig, ax1 = plt.subplots(figsize=(6, 4))
        sel = [x for x in rows if x.get("phase", "select") != "refit"]
        refit = [x for x in rows if x.get("phase") == "refit"]
        ax1.plot([x["epoch"] for x in sel], [x["loss"] for x in sel], marker="o", color="tab:blue",
                 label="training loss")
        if refit:
            ax1.plot([x["epoch"] for x in refit], [x["loss"] for x in refit], marker="o", ls="--", color="tab:green",
                     label="refit loss (training + validation)")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax2 = ax1.twinx()
        ax2.plot([x["epoch"] for x in sel], [x["val_recall@100"] for x in sel], marker="s", color="tab:orange",
                 label="val recall@100")
        ax2.set_ylabel("validation recall@100")
        fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.5))
        fig.tight_layout()
        fig.savefig(d / "training.png", dpi=110)
        plt.close(fig)
    md = [
        f"# ebr report: {res['dataset']}",
        "",
        f"Protocol `{res['protocol']}` (split `{res.get('split')}`), {res['n_users']:,} warm users, "
        f"{res['n_cold_users']:,} cold users; bundle `{res.get('bundle')}`.",
        "",
        "```",
        format_table(res),
        "```",
        "",
        "![recall@K](recall_at_k.png)",
        "",
    ]
    if rows:
        md += ["![training](training.png)", ""]
    (d / "report.md").write_text("\n".join(md))
    return d
