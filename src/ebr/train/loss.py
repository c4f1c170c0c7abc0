"""Sampled softmax over in-batch negatives with logQ correction (Yi et al., RecSys 2019).

logit_ij = <u_i, v_j> / tau - log p_j, for every column j (the positive's included);
L = -(1/B) sum_i w_i log softmax_j(logit_ij)[i]; columns j != i holding row i's positive item
(accidental hits) are masked out. p_j is the exact in-batch inclusion probability from the
training counts by default (`inclusion_log_prob`), or Yi et al.'s streaming estimate
(`FrequencyEstimator`; train.logq_estimator: streaming). Subtracting log p_j removes the popularity bias of in-batch
negatives: a frequent item appears as a negative often, so its logit is lowered in training to
make the learned score estimate the unbiased one. Adding log p (a sign error peers have made)
doubles the bias instead; the tests pin the sign.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def inclusion_log_prob(counts: np.ndarray, batch_size: int) -> torch.Tensor:
    """log p_j for every item, p_j = 1 - (1 - n_j / N)^B: the probability that item j is among the
    positives of a batch of B examples drawn from the N training examples, n_j of which hold j
    (the default estimate: the training data is known before training). counts (P,) -> (P,).
    Items never seen count as seen once (they are never a positive, so the value is unused)."""
    n = torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64)
    N = float(max(int(np.sum(counts)), 1))
    return torch.log(-torch.expm1(batch_size * torch.log1p(-n / N))).to(torch.float32)


class FrequencyEstimator:
    """Streaming estimate of the probability that an item appears in a batch (Yi et al.).

    Per hash function k and bucket h: A[h] = last step the bucket was seen (0 = the start of
    training), B[h] = average gap between sightings, C[h] = sightings. At step t, for each item y
    in the batch: a = max(alpha, 1 / C[h]); B[h] <- (1 - a) B[h] + a (t - A[h]); A[h] <- t. Then
    p(y) = 1 / max_k B_k[h_k(y)] (collisions only shrink gaps, so the max over hashes is the
    least-collided estimate). The 1 / C warm start makes B the plain mean of the gaps seen so far
    until there are 1 / alpha of them: starting from B = 0 with a fixed alpha, an item first seen
    at step t got B = alpha t whatever its frequency, and the correction ran at a fraction of its
    strength. It reads nothing but the batches.
    """

    def __init__(self, buckets: int = 1 << 20, hashes: int = 2, alpha: float = 0.01, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.bits = max(1, int(buckets - 1).bit_length())  # buckets rounded up to a power of two
        self.buckets, self.alpha = 1 << self.bits, alpha
        # multiply-shift hashing (Dietzfelbinger): random odd 64-bit multipliers, the product's top
        # bits; int64 products wrap, which is the arithmetic mod 2^64 the scheme needs
        self.mult = torch.randint(-(1 << 63), (1 << 63) - 1, (hashes,), generator=g, dtype=torch.int64) | 1
        self.add = torch.randint(-(1 << 63), (1 << 63) - 1, (hashes,), generator=g, dtype=torch.int64)
        buckets = self.buckets
        self.A = torch.zeros(hashes, buckets, dtype=torch.float64)
        self.B = torch.zeros(hashes, buckets, dtype=torch.float64)
        self.C = torch.zeros(hashes, buckets, dtype=torch.float64)

    def _hash(self, ids: torch.Tensor) -> torch.Tensor:  # (H, N)
        prod = ids.to(torch.int64)[None, :] * self.mult[:, None] + self.add[:, None]
        return (prod >> (64 - self.bits)) & (self.buckets - 1)

    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record the items of the batch seen at `step` (duplicates within a batch count once)."""
        h = self._hash(torch.unique(ids))
        for k in range(h.shape[0]):
            hk = torch.unique(h[k])  # items colliding in this batch are one sighting of the bucket
            self.C[k, hk] += 1
            a = torch.clamp(1.0 / self.C[k, hk], min=self.alpha)
            self.B[k, hk] = (1 - a) * self.B[k, hk] + a * (step - self.A[k, hk])
            self.A[k, hk] = float(step)

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(y) = -log max_k B_k[h_k(y)], with gaps below one step clamped (p <= 1)."""
        h = self._hash(ids)
        gap = torch.stack([self.B[k, h[k]] for k in range(h.shape[0])]).max(0).values
        return -torch.log(gap.clamp(min=1.0)).to(torch.float32)

    def state_dict(self) -> dict:
        return {"A": self.A.clone(), "B": self.B.clone(), "C": self.C.clone(), "mult": self.mult, "add": self.add,
                "alpha": self.alpha}

    def load_state_dict(self, s: dict) -> None:
        self.A, self.B, self.C = s["A"].clone(), s["B"].clone(), s["C"].clone()
        self.mult, self.add, self.alpha = s["mult"], s["add"], s["alpha"]
        self.buckets = self.A.shape[1]
        self.bits = self.buckets.bit_length() - 1


def sampled_softmax_logq(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
    weight: torch.Tensor | None = None,
    neg: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    row_offset: int = 0,
    norm: int | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """user (R, D) rows, item (B, D) the batch's positives, item_ids (B,), log_q (B,) or None (no
    correction); row r's positive is column row_offset + r (R = B, offset 0 on one process; a rank
    of a distributed step holds R of the global batch's rows and every rank's positives as
    columns); optional extra negatives neg (N, D) with ids (N,) and log q (N,) (mixed negative
    sampling); optional `extra` (R, B + N) logits added to every (row, column) pair before the
    correction (the pin-age term; -inf removes a column from a row: a pin that does not exist yet
    at the row's time is no negative); optional `exclude` (R, B) bool: positives that are no
    negative for a row (another row's positive of the same user), the row's own column kept.
    Returns sum_r w_r nll_r / norm (norm: the global batch size, default R)."""
    R = user.shape[0]
    pos = torch.arange(R) + row_offset
    logits = user @ item.T / temperature
    ids = item_ids
    if log_q is not None:
        logits = logits - log_q[None, :]
    if neg is not None:
        nl = user @ neg.T / temperature
        if neg_log_q is not None:
            nl = nl - neg_log_q[None, :]
        logits = torch.cat([logits, nl], dim=1)
        ids = torch.cat([item_ids, neg_ids])
    if extra is not None:
        logits = logits + extra
    hit = item_ids[pos][:, None] == ids[None, :]
    if exclude is not None:
        hit[:, : exclude.shape[1]] |= exclude
    hit[torch.arange(R), pos] = False  # the row's own positive stays
    logits = logits.masked_fill(hit, float("-inf"))
    nll = -F.log_softmax(logits, dim=1)[torch.arange(R), pos]
    w = torch.ones_like(nll) if weight is None else weight
    return (w * nll).sum() / (R if norm is None else norm)
