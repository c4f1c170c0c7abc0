"""Ranking and offline metrics, shared by training's validation and `ebr eval` (one
implementation of each; pure numpy/torch, no I/O).

Recall@K = |top-K ∩ targets| / |targets|; NDCG@K with binary gains and ideal DCG over
min(|targets|, K) positions; HR@K = 1 if any target is in the top K; coverage@K = share of the
interests of the user's targets present among the top K's interests. All averaged over users.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def topk_masked(scores: torch.Tensor, k: int, exclude: Sequence[np.ndarray] | None = None,
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (U, P); exclude[i] = column indices ranked out for row i; allowed (P,) bool.
    Returns (values (U, k), indices (U, k)); k is capped at P."""
    scores = scores.clone()
    if allowed is not None:
        scores[:, ~allowed] = float("-inf")
    if exclude is not None:
        rows = np.repeat(np.arange(len(exclude)), [len(x) for x in exclude])
        cols = np.concatenate(exclude) if len(exclude) else np.zeros(0, dtype=np.int64)
        if len(cols):
            scores[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = float("-inf")
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)


def metrics_at_k(topk: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int],
                 pin_interests: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """topk (U, Kmax) ranked candidate ids (-1 = empty slot); targets[i] = ids of user i's targets."""
    out: dict[str, list[float]] = {}
    discounts = 1.0 / np.log2(np.arange(2, topk.shape[1] + 2))
    for row, tgt in zip(topk, targets):
        tset = set(np.asarray(tgt).tolist())
        hits = np.fromiter((x in tset for x in row.tolist()), dtype=bool, count=len(row))
        t_int = set(i for p in tset for i in pin_interests[p]) if pin_interests is not None else set()
        for k in ks:
            h = hits[:k]
            out.setdefault(f"recall@{k}", []).append(h.sum() / len(tset))
            out.setdefault(f"hr@{k}", []).append(float(h.any()))
            ideal = discounts[: min(len(tset), k)].sum()
            out.setdefault(f"ndcg@{k}", []).append(float((discounts[:k][h]).sum() / ideal))
            if pin_interests is not None and t_int:
                got = set(i for p in row[:k].tolist() if p >= 0 for i in pin_interests[p])
                out.setdefault(f"coverage@{k}", []).append(len(t_int & got) / len(t_int))
    return {name: float(np.mean(v)) for name, v in out.items()}
