"""Ranking and offline metrics, shared by training's validation and `ebr eval` (one
implementation of each; pure numpy/torch, no I/O).

Recall@K = |top-K ∩ targets| / |targets|; NDCG@K with binary gains and ideal DCG over
min(|targets|, K) positions; HR@K = 1 if any target is in the top K; coverage@K = share of the
interests of the user's targets present among the top K's interests; diversity@K (K <= 100) =
intra-list diversity, 1 - the mean interest-set Jaccard similarity over the pairs of the top K (two
pins without interests count as alike). All averaged over users.
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


def max_over_embeddings(queries: torch.Tensor, active: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Multi-embedding scores: each item's best score over the user's active embeddings.
    queries (B, K, D), active (B, K) bool (at least one per row), items (N, D) -> (B, N)."""
    out = torch.full((queries.shape[0], items.shape[0]), float("-inf"))
    for j in range(queries.shape[1]):
        s = (queries[:, j] @ items.T).masked_fill(~active[:, j : j + 1], float("-inf"))
        out = torch.maximum(out, s)
    return out


def metrics_at_k(topk: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int],
                 pin_interests: Sequence[Sequence[int]] | None = None, per_user: bool = False) -> dict:
    """topk (U, Kmax) ranked candidate ids (-1 = empty slot); targets[i] = ids of user i's targets.
    Each metric averaged over users; per_user: each user's value instead, an array per metric
    (recall, hr and ndcg hold one value per row of topk; coverage and diversity skip rows where
    they are undefined)."""
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
            if pin_interests is not None and k <= DIVERSITY_MAX_K:
                d = intra_list_diversity([pin_interests[p] for p in row[:k].tolist() if p >= 0])
                if d is not None:
                    out.setdefault(f"diversity@{k}", []).append(d)
    return {name: np.asarray(v, dtype=np.float64) if per_user else float(np.mean(v)) for name, v in out.items()}


DIVERSITY_MAX_K = 100


def intra_list_diversity(interests: Sequence[Sequence[int]]) -> float | None:
    """1 - mean pairwise Jaccard similarity of the items' interest sets (None for fewer than 2 items)."""
    n = len(interests)
    if n < 2:
        return None
    codes = np.concatenate([np.asarray(x, dtype=np.int64) for x in interests] + [np.zeros(0, dtype=np.int64)])
    _, inv = np.unique(codes, return_inverse=True)
    X = np.zeros((n, max(int(inv.max()) + 1 if len(inv) else 0, 1)), dtype=np.float32)
    rows = np.repeat(np.arange(n), [len(x) for x in interests])
    X[rows, inv] = 1.0
    inter = X @ X.T
    size = X.sum(1)
    union = size[:, None] + size[None, :] - inter
    sim = np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)
    off = ~np.eye(n, dtype=bool)
    return float(1.0 - sim[off].mean())
