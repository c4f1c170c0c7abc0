"""Bundles: everything the service (and offline evaluation) needs, nothing from train/.

bundles/VERSION/
  user_tower.pt2        the user tower, torch.export'ed for CPU (dynamic batch; no code unpickled)
  item_repr.npy         (P, H) the shared ItemEncoder's output per pin: history inputs of the tower
  pin_embeddings.npy    (P, D) what the index stores: pin-tower outputs (unit norm, then tau * b_i
                        with model.pin_bias), then the time term's pin embedding as of the
                        bundle's time (age, recent counts), if any
  index.faiss           the ANN index over the candidate pins (exact | hnsw | ivfpq)
  index_codes.npy       the pin code of each index position
  pins.parquet          pin_id, code, interests, candidate flag (in the corpus, when one is given)
  user_state.npz        per user code: history (U, L), actions (U, L), categorical codes (U, Cu),
                        followed interest codes (U, K), engaged pins (CSR), as of the bundle's time
  popular.npy           pin codes by time-decayed popularity (cold-start path)
  feature_state.json    vocabularies and numeric statistics
  manifest.json         model version (for the tower and the index), checksums, inputs, counts
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ebr.config import ModelConfig, RunConfig
from ebr.data.splits import Part, load_split
from ebr.errors import EbrError
from ebr.features.batches import user_batch
from ebr.features.examples import T_MAX
from ebr.features.snapshot import ALL_PARTS, build_snapshot
from ebr.features.state import ACTION_CODE, FIRST_ID, FeatureState
from ebr.index.backends import AnnIndex, SearchDefaults, build_index
from ebr.index.verify import BUNDLE_FILES, content_hash
from ebr.log import log
from ebr.model.towers import TwoTower
from ebr.ranking import topk_masked
from ebr.workspace import (
    Workspace,
    file_sha256,
    library_versions,
    load_checkpoint_state,
    now_utc,
    read_json,
    version_stamp,
    write_json,
)

POPULARITY_HALF_LIFE_DAYS = 14.0


def load_checkpoint(path: Path) -> tuple[TwoTower, dict[str, Any]]:
    """A run checkpoint -> (model in eval mode, checkpoint dict). Plain tensors: weights_only."""
    ck = load_checkpoint_state(path)
    cfg = ModelConfig.model_validate(ck["config"]["model"])
    model = TwoTower(ck["sizes"], cfg)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def served_checkpoint(ws: Workspace, run: str) -> Path:
    """The checkpoint a run serves: the refit model when the run has one, else the selected one."""
    ck = ws.run_dir(run) / "checkpoints"
    return ck / "refit.pt" if (ck / "refit.pt").exists() else ck / "best.pt"


def export_user_tower(model: TwoTower, L: int, n_user_cat: int, n_followed: int, path: Path) -> None:
    """torch.export the user tower with a dynamic batch dimension and save it (.pt2) without sample
    inputs: torch unpickles those on load, so the loader refuses an archive that has any."""
    B = 4
    H = model.items.out_dim
    args = (torch.randn(B, L, H), torch.randint(0, 6, (B, L)), torch.zeros(B, n_user_cat, dtype=torch.long),
            torch.zeros(B, n_followed, dtype=torch.long), torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(model.user, args, dynamic_shapes=({0: batch},) * len(args))
    ep.example_inputs = None
    torch.export.save(ep, path)


def decayed_popularity(e, as_of_t: int, half_life_days: float = POPULARITY_HALF_LIFE_DAYS,
                       weights: dict[str, float] | None = None, visible: np.ndarray | None = None,
                       n_pins: int | None = None) -> np.ndarray:
    """Per-pin score: sum of positive engagements weighted by 2^(-age / half-life) (raw counts
    when the data has no time). Returns (P,) float64."""
    weights = weights or {"closeup": 1.0, "click": 1.0, "save": 1.0}
    w = np.zeros(8)
    for a, x in weights.items():
        w[ACTION_CODE[a]] = x
    m = w[e.action] > 0
    if visible is not None:
        m &= visible
    t = e.t[m].astype(np.float64)
    if not e.timed:  # pseudo-time (file order): no decay
        decay = np.ones_like(t)
    else:
        ref = float(as_of_t) if as_of_t != T_MAX else t.max()
        decay = np.power(2.0, -(ref - t) / (half_life_days * 86400e6))
    return np.bincount(e.pin[m], weights=w[e.action[m]] * decay, minlength=n_pins or int(e.pin.max()) + 1)


@torch.no_grad()
def index_recall(index: AnnIndex, ub, model: TwoTower, item_repr: np.ndarray, pin_emb: np.ndarray,
                 candidate: np.ndarray, sample: int, seed: int, k: int = 100) -> float | None:
    """Recall@k of the index against exact search for a sample of users with history."""
    warm = np.flatnonzero((ub.hist > 0).any(1).numpy())
    if len(warm) == 0 or index.backend == "exact":
        return 1.0 if index.backend == "exact" else None
    users = np.random.default_rng(seed).choice(warm, min(sample, len(warm)), replace=False)
    h = torch.from_numpy(item_repr)[ub.hist[users]]
    q = model.user(h, *(x[users] for x in ub.rest()))
    if isinstance(q, tuple):  # a multi-embedding tower: every active embedding of the sampled users
        q = q[0][q[1]]
    exact = topk_masked(q @ torch.from_numpy(pin_emb).T, k, None, torch.from_numpy(candidate))[1].numpy()
    _, got = index.search(q.numpy(), k, SearchDefaults())
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), exact.tolist())]))


def build_bundle(ws: Workspace, run: str = "main", split: str | None = None, backend: str = "exact",
                 corpus: str | None = None, recall_sample: int = 500) -> Path:
    """Build a bundle from the run's served checkpoint (refit, else best), with user state as of the split's cut
    (the end of its training parts), or as of the latest data when split is 'latest'."""
    t0 = time.time()
    ck_path = served_checkpoint(ws, run)
    if not ck_path.exists():
        raise EbrError(f"run {run!r} has no best checkpoint; train it first: ebr train --run {run}")
    model, ck = load_checkpoint(ck_path)
    run_cfg = RunConfig.model_validate(ck["config"])
    fs = FeatureState.from_dict(ck["feature_state"])
    model_version = file_sha256(ck_path)[:16]
    L = run_cfg.features.history_len
    # user state, histories, statistics and candidates from what is visible at the bundle's time
    if split == "latest":
        snap = build_snapshot(ws, fs, load_split(ws, None), run_cfg.features, run_cfg.train.seed, ALL_PARTS)
        split_name = "latest"
    else:
        snap = build_snapshot(ws, fs, load_split(ws, split or ck.get("split")), run_cfg.features,
                              run_cfg.train.seed, (Part.TRAIN, Part.VALIDATION))
        split_name = snap.split.name
    e, visible, pins, pin_interests, ua = snap.e, snap.visible, snap.pins, snap.pin_interests, snap.users
    stats_all = snap.pin_stats_all()
    all_stats = None if stats_all is None else torch.from_numpy(stats_all)
    item_repr, pin_emb = model.encode_all_pins(pins.fields(), all_stats)
    # the index stores each pin with its time term as of the bundle's time (features/age.py: rebuild daily)
    P = len(fs.pins)
    tb = None if snap.time is None else torch.from_numpy(snap.time.buckets(np.arange(P), snap.as_of))
    item_repr, pin_emb = item_repr.numpy(), model.index_vectors(pin_emb, tb).numpy()
    U = len(fs.users)
    gap = bool(ck["sizes"].get("user_gap"))  # features.user_gap: each user's time since the last engagement
    ub = user_batch(np.arange(U), np.full(U, T_MAX), snap.hist, ua, L, gap_as_of=snap.as_of if gap else None)
    engaged = visible & (e.action != ACTION_CODE["impression"])
    order = np.lexsort((e.pin[engaged], e.user[engaged]))
    eu, ep = e.user[engaged][order], e.pin[engaged][order]
    keep = np.r_[True, (eu[1:] != eu[:-1]) | (ep[1:] != ep[:-1])] if len(eu) else np.zeros(0, bool)
    eu, ep = eu[keep], ep[keep]
    ptr = np.searchsorted(eu, np.arange(U + 1))
    as_of = snap.as_of
    pop = decayed_popularity(e, T_MAX, visible=visible, n_pins=len(fs.pins))
    pop[:FIRST_ID] = -1  # padding / OOV rows
    popular = np.argsort(-pop, kind="stable")[: min(10000, len(fs.pins) - FIRST_ID)]

    tmp = ws.bundles_dir() / f".{model_version}-{os.getpid()}-{time.time_ns()}.tmp"
    tmp.mkdir(parents=True)
    try:  # a failed build leaves no half-written bundle behind
        log.info("bundle: exporting the user tower and %s pin embeddings", f"{len(pin_emb):,}")
        export_user_tower(model, L, ub.cat.shape[1], ub.followed.shape[1], tmp / "user_tower.pt2")
        np.save(tmp / "item_repr.npy", item_repr)
        np.save(tmp / "pin_embeddings.npy", pin_emb)
        candidate = snap.candidates.copy()  # a pin born after the bundle's time is not a candidate yet
        corpus_version = None
        if corpus:
            from ebr.corpus.build import resolve

            cdir = resolve(ws, corpus)
            corpus_version = cdir.name
            in_corpus = np.zeros_like(candidate)
            in_corpus[fs.pins.encode(pq.read_table(cdir / "corpus.parquet")["pin_id"])] = True
            candidate &= in_corpus
        t_index = time.time()
        log.info("bundle: building the %s index over %s candidate pins", backend, f"{int(candidate.sum()):,}")
        index = build_index(backend, pin_emb, np.flatnonzero(candidate))
        index_seconds = time.time() - t_index
        index.save(tmp)
        ann_recall = index_recall(index, ub, model, item_repr, pin_emb, candidate, recall_sample, run_cfg.train.seed)
        pin_ids = ["<pad>", "<oov>"] + fs.pins.ids
        pq.write_table(
            pa.table(
                {
                    "pin_id": pin_ids,
                    "code": np.arange(len(pin_ids)),
                    "candidate": candidate,
                    "interests": pa.array(pin_interests, type=pa.list_(pa.int64())),
                }
            ),
            tmp / "pins.parquet",
        )
        np.savez(
            tmp / "user_state.npz",
            hist=ub.hist.numpy().astype(np.int32),
            actions=ub.actions.numpy().astype(np.int8),
            cat=ub.cat.numpy().astype(np.int32),  # with the gap column (features.user_gap)
            # followed interests only where the tower reads them (else a no-history user is not "featured")
            followed=(ua.followed_pad if model.user.followed is not None else np.zeros_like(ua.followed_pad))
            .astype(np.int32),
            engaged_ptr=ptr.astype(np.int64),
            engaged=ep.astype(np.int32),
        )
        np.save(tmp / "popular.npy", popular)
        (tmp / "feature_state.json").write_text(json.dumps(fs.to_dict()))
        manifest = {
            "run": run,
            "split": split_name,
            "created_at": now_utc().isoformat(),
            "as_of_us": as_of,
            "history_len": L,
            "embedding_dim": int(pin_emb.shape[1]),
            "user_tower": {"file": "user_tower.pt2", "model_version": model_version,
                           "followed_interests": model.user.followed is not None,
                           # features.user_gap: the last categorical column, as of as_of_us
                           "user_gap": gap,
                           "embeddings": run_cfg.model.user_embeddings},
            "index": {
                "file": "index.faiss",
                "backend": backend,
                "model_version": model_version,
                "metric": "inner_product",
                "search": asdict(SearchDefaults()),
                "build_seconds": round(index_seconds, 2),
                "recall@100_vs_exact": ann_recall,
                "corpus": corpus_version,
            },
            "checkpoint": {"path": str(ck_path), "sha256": file_sha256(ck_path), "refit": bool(ck.get("refit"))},
            "time_term": {"fields": snap.time.sizes if snap.time is not None else [], "as_of_us": as_of},
            "counts": {"pins": len(fs.pins) - FIRST_ID, "candidates": int(candidate.sum()), "users": U - FIRST_ID},
            "modes": (["single"] if model.user.clusters is None else ["single", "multi"])
            + (["conditional", "auto"] if run_cfg.model.conditional else []),
            "config": ck["config"],
            "checksums": {f: file_sha256(tmp / f) for f in BUNDLE_FILES},
            "libraries": library_versions(),
            "seconds": round(time.time() - t0, 2),
        }
        # the version's hash part covers the manifest, which covers every file (index/verify.py)
        manifest["version"] = version = f"{version_stamp()}-{content_hash(manifest)}"
        write_json(tmp / "manifest.json", manifest)
        out = ws.bundles_dir() / version
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def find_bundle(ws: Workspace, run: str, split: str, backend: str = "exact") -> Path | None:
    """The latest bundle of this run's current best checkpoint for this split, if any."""
    ck_path = served_checkpoint(ws, run)
    if not ck_path.exists() or not ws.bundles_dir().exists():
        return None
    sha = file_sha256(ck_path)
    for d in sorted(ws.bundles_dir().iterdir(), reverse=True):
        m = d / "manifest.json"
        if d.name.startswith(".") or not m.exists():
            continue
        man = read_json(m)
        key = (
            man["run"],
            man["split"],
            man["index"]["backend"],
            man["index"].get("corpus"),
            man["checkpoint"]["sha256"],
        )
        if key == (run, split, backend, None, sha):
            return d
    return None
