"""Merging several ranked lists (one per user embedding, or per interest) into one, under one budget.

- `round_robin`: visit the lists in order, each taking its next item not already taken, until each
  list has filled its quota (quotas sum to k); if lists run dry before k, the others continue
  round-robin past their quotas. What the service returns in multi mode.
- `max_merge`: each item scored by its best list; the k best distinct items. With exact search and
  each list holding its embedding's top k, this is exactly the top k by max-over-embeddings score
  (EVALUATION.md's offline multi-embedding score).

Lists are (codes, scores) arrays ranked best first; code -1 is an empty slot. Results are (codes,
scores, source list index) of length <= k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def quotas(k: int, importance: np.ndarray | None, n: int) -> np.ndarray:
    """Each of n lists' share of k: equal (the first k mod n lists get one more), or proportional to
    importance (largest remainders; ties and zero total mass fall back to equal)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    equal = np.full(n, k // n, dtype=np.int64)
    equal[: k % n] += 1
    if importance is None:
        return equal
    w = np.clip(np.asarray(importance, dtype=np.float64)[:n], 0.0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        return equal
    share = k * w / w.sum()
    q = np.floor(share).astype(np.int64)
    rest = k - int(q.sum())
    order = np.argsort(-(share - q), kind="stable")
    q[order[:rest]] += 1
    return q


def round_robin(lists: Sequence[tuple[np.ndarray, np.ndarray]], k: int,
                quota: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    quota = quotas(k, None, len(lists)) if quota is None else np.asarray(quota)
    codes, scores, src = [], [], []
    seen: set[int] = set()
    ptr = [0] * len(lists)
    taken = [0] * len(lists)
    for capped in (True, False):  # first within quotas, then past them if some list ran dry
        progress = True
        while progress and len(codes) < k:
            progress = False
            for j, (c, s) in enumerate(lists):
                if len(codes) >= k or (capped and taken[j] >= quota[j]):
                    continue
                while ptr[j] < len(c):
                    x = int(c[ptr[j]])
                    ptr[j] += 1
                    if x >= 0 and x not in seen:
                        seen.add(x)
                        codes.append(x)
                        scores.append(float(s[ptr[j] - 1]))
                        src.append(j)
                        taken[j] += 1
                        progress = True
                        break
    return np.array(codes, dtype=np.int64), np.array(scores, dtype=np.float32), np.array(src, dtype=np.int64)


def max_merge(lists: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not lists:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    c = np.concatenate([x[0] for x in lists])
    s = np.concatenate([x[1] for x in lists]).astype(np.float32)
    j = np.concatenate([np.full(len(x[0]), i, dtype=np.int64) for i, x in enumerate(lists)])
    ok = c >= 0
    c, s, j = c[ok], s[ok], j[ok]
    order = np.lexsort((j, -s))  # best score first; ties to the earlier list
    c, s, j = c[order], s[order], j[order]
    _, first = np.unique(c, return_index=True)
    first = np.sort(first)[:k]
    return c[first], s[first], j[first]
