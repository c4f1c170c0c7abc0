"""Sampled softmax over in-batch negatives with logQ correction (Yi et al., RecSys 2019).

logit_ij = <u_i, v_j> / tau - log p_j, for every column j (the positive's included);
L = -(1/B) sum_i w_i log softmax_j(logit_ij)[i]; columns j != i holding row i's positive item
(accidental hits) are masked out. Subtracting log p_j removes the popularity bias of in-batch
negatives: a frequent item appears as a negative often, so its logit is lowered in training to
make the learned score estimate the unbiased one. Adding log p (a sign error peers have made)
doubles the bias instead; the tests pin the sign.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PRIME = (1 << 61) - 1


class FrequencyEstimator:
    """Streaming estimate of the probability that an item appears in a batch.

    Per hash function k and bucket h: A[h] = last step the bucket was seen, B[h] = moving average
    of the gap between sightings. At step t, for each item y in the batch:
    B[h] <- (1 - a) B[h] + a (t - A[h]); A[h] <- t. Then p(y) = 1 / max_k B_k[h_k(y)]
    (collisions only shrink gaps, so the max over hashes is the least-collided estimate).
    """

    def __init__(self, buckets: int = 1 << 20, hashes: int = 2, alpha: float = 0.01, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.buckets, self.alpha = buckets, alpha
        self.mult = torch.randint(1, 1 << 30, (hashes,), generator=g, dtype=torch.int64) * 2 + 1
        self.add = torch.randint(0, 1 << 30, (hashes,), generator=g, dtype=torch.int64)
        self.A = torch.zeros(hashes, buckets, dtype=torch.float64)
        self.B = torch.zeros(hashes, buckets, dtype=torch.float64)

    def _hash(self, ids: torch.Tensor) -> torch.Tensor:  # (H, N)
        return ((ids.to(torch.int64)[None, :] * self.mult[:, None] + self.add[:, None]) % _PRIME) % self.buckets

    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record the items of the batch seen at `step` (duplicates within a batch count once)."""
        h = self._hash(torch.unique(ids))
        for k in range(h.shape[0]):
            hk = h[k]
            self.B[k, hk] = (1 - self.alpha) * self.B[k, hk] + self.alpha * (step - self.A[k, hk])
            self.A[k, hk] = float(step)

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(y) = -log max_k B_k[h_k(y)], with gaps below one step clamped (p <= 1)."""
        h = self._hash(ids)
        gap = torch.stack([self.B[k, h[k]] for k in range(h.shape[0])]).max(0).values
        return -torch.log(gap.clamp(min=1.0)).to(torch.float32)

    def state_dict(self) -> dict:
        return {"A": self.A.clone(), "B": self.B.clone(), "mult": self.mult, "add": self.add, "alpha": self.alpha}

    def load_state_dict(self, s: dict) -> None:
        self.A, self.B, self.mult, self.add, self.alpha = s["A"].clone(), s["B"].clone(), s["mult"], s["add"], s["alpha"]
        self.buckets = self.A.shape[1]


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
) -> torch.Tensor:
    """user (B, D), item (B, D) positives, item_ids (B,), log_q (B,) or None (no correction);
    optional extra negatives neg (N, D) with ids (N,) and log q (N,) (mixed negative sampling).
    Returns the scalar loss."""
    B = user.shape[0]
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
    hit = item_ids[:, None] == ids[None, :]
    hit[:, :B].fill_diagonal_(False)  # the row's own positive stays
    logits = logits.masked_fill(hit, float("-inf"))
    nll = -F.log_softmax(logits, dim=1)[torch.arange(B), torch.arange(B)]
    w = torch.ones_like(nll) if weight is None else weight
    return (w * nll).sum() / B
