"""Multi-embedding users: the user's history split into interest clusters (TECHNIQUES.md section 6).

Every extractor takes the history items (B, L, item_dim) with their actions and returns
`Clusters`: K_max cluster vectors (B, K_max, d), which of them are active (the first K, K from the
history length), each cluster's importance (routing mass) and each history item's cluster (-1:
invalid item). The user tower fuses each active cluster with the user's other fields into one
embedding (model/towers.py).

- `CapsuleRouting` (KDD'25, the default multi kind): items summarised e_i = W2 GELU(W1 x_i + a_i);
  a shared bilinear map S; affinity b_ij = c_j^T S e_i, weights w_ij = softmax_j(b_ij) over the
  active clusters, c_j = squash(sum_i w_ij S e_i), `iterations` times. Centres start from a
  maxmin choice over the valid items (the medoid first, then repeatedly the item least similar to
  every centre chosen so far: the first K are the most spread out). Single assignment: each item
  contributes only to its argmax cluster (hard routing).
  Ablations: `init="random"` (fixed random initial logits, as MIND), `assignment="soft"`.
- MIND-style routing is `CapsuleRouting(init="random", assignment="soft")`.
- `SelfAttentionInterests` (ComiRec-SA): A = softmax_i(W2 tanh(W1 e_i)) per head, c_j = sum_i A_ij e_i;
  importance = the number of items whose strongest head is j.

Every extractor returns its active clusters ordered by importance (most important first): the
order the explorer shows and the round-robin merge visits. Hard assignment can leave a cluster
with no history item: its embedding is then the user's other fields alone (the explorer shows
such embeddings bringing pins of no interest of the user's). `model.multi.drop_empty` drops them;
off by default, as validation chose (README).

Valid history items: an action other than padding and hide (unknown pins never reach the tower:
the Retriever drops them). K = clamp(ceil(log2 n_valid), 1, K_max) (`k_rule="log2"`) or
min(fixed_k, K_max) (`k_rule="fixed"`), never more than n_valid (at least 1: a user without history
gets one embedding from the other fields).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ebr.model.ops import lookup

HIDE_CODE = 5  # features.state.HIDE
N_ACTIONS = 6


class Clusters(NamedTuple):
    vectors: torch.Tensor  # (B, K_max, d)
    active: torch.Tensor  # (B, K_max) bool: the first K
    importance: torch.Tensor  # (B, K_max) routing mass (0 for inactive clusters)
    assign: torch.Tensor  # (B, L) int64: the cluster of each history item, -1 for invalid items


def valid_items(actions: torch.Tensor) -> torch.Tensor:
    """(B, L) actions -> (B, L) bool: the items that take part in pooling and clustering."""
    return (actions > 0) & (actions != HIDE_CODE)


def n_embeddings(n_valid: torch.Tensor, k_max: int, k_rule: str = "log2", fixed_k: int = 4) -> torch.Tensor:
    """(B,) valid history lengths -> (B,) number of embeddings K (at least 1, at most n_valid)."""
    n = n_valid.to(torch.float32)
    if k_rule == "log2":
        k = torch.ceil(torch.log2(n.clamp(min=1.0)))
    elif k_rule == "fixed":
        k = torch.full_like(n, float(fixed_k))
    else:
        raise ValueError(f"unknown k_rule {k_rule!r}; available: log2, fixed")
    k = torch.minimum(k.clamp(min=1.0, max=float(k_max)), n.clamp(min=1.0))
    return k.to(torch.int64)


def squash(s: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / |s| along the last dimension."""
    n2 = (s * s).sum(-1, keepdim=True)
    return n2 / (1.0 + n2) * s / torch.sqrt(n2 + eps)


class ItemSummariser(nn.Module):
    """e_i = W2 GELU(W1 x_i + a(action_i)): (B, L, item_dim), (B, L) -> (B, L, d)."""

    def __init__(self, item_dim: int, d: int):
        super().__init__()
        self.w1 = nn.Linear(item_dim, d)
        self.action = nn.Embedding(N_ACTIONS, d)
        self.w2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x) + lookup(self.action, actions)))


def _finish(c: Clusters, drop_empty: bool) -> Clusters:
    """Order the active clusters by importance (descending; inactive ones last), remapping the
    assignments; with drop_empty, a cluster no history item was routed to (importance 0, possible
    under hard assignment) is no embedding: its output would be the user's fields alone. Every user
    keeps at least one embedding."""
    active = c.active & (c.importance > 0) if drop_empty else c.active
    key = c.importance.masked_fill(~active, float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)  # (B, K): new position -> old cluster
    rank = torch.argsort(order, dim=1)  # old cluster -> new position
    n = active.sum(1, keepdim=True).clamp(min=1)
    active = torch.arange(active.shape[1])[None, :] < n  # a prefix after the reorder
    vec = torch.gather(c.vectors, 1, order[..., None].expand_as(c.vectors)) * active[..., None]
    imp = torch.gather(c.importance, 1, order) * active
    assign = torch.where(c.assign >= 0, torch.gather(rank, 1, c.assign.clamp(min=0)), c.assign)
    return Clusters(vec, active, imp, assign)


class CapsuleRouting(nn.Module):
    def __init__(self, item_dim: int, d: int, k_max: int = 7, iterations: int = 3, init: str = "maxmin",
                 assignment: str = "single", k_rule: str = "log2", fixed_k: int = 4, max_len: int = 1024,
                 drop_empty: bool = False):
        super().__init__()
        if init not in ("maxmin", "random") or assignment not in ("single", "soft"):
            raise ValueError(f"capsule routing: init {init!r} / assignment {assignment!r} unknown")
        self.summ = ItemSummariser(item_dim, d)
        self.S = nn.Linear(d, d, bias=False)  # the shared bilinear map
        self.k_max, self.iterations, self.init, self.assignment = k_max, iterations, init, assignment
        self.k_rule, self.fixed_k, self.drop_empty = k_rule, fixed_k, drop_empty
        # MIND's random initial routing logits, drawn once so serving is deterministic
        self.register_buffer("b0", torch.randn(max_len, k_max, generator=torch.Generator().manual_seed(0)))

    def _maxmin(self, se: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Centre item indices (B, K_max): the medoid, then repeatedly the valid item whose largest
        similarity to the centres chosen so far is smallest."""
        z = F.normalize(se.detach(), dim=-1)
        sim = z @ z.transpose(1, 2)  # (B, L, L)
        pair = valid[:, :, None] & valid[:, None, :]
        total = (sim * pair).sum(2).masked_fill(~valid, float("-inf"))
        first = total.argmax(1)  # (B,)
        picks = [first]
        closest = torch.gather(sim, 2, first[:, None, None].expand(-1, sim.shape[1], 1)).squeeze(2)  # (B, L)
        taken = F.one_hot(first, sim.shape[1]).bool()
        for _ in range(1, self.k_max):
            score = closest.masked_fill(~valid | taken, float("inf"))
            nxt = score.argmin(1)
            picks.append(nxt)
            taken = taken | F.one_hot(nxt, sim.shape[1]).bool()
            closest = torch.maximum(closest, torch.gather(sim, 2, nxt[:, None, None].expand(-1, sim.shape[1], 1))
                                    .squeeze(2))
        return torch.stack(picks, 1)

    def forward(self, x: torch.Tensor, actions: torch.Tensor) -> Clusters:
        B, L, _ = x.shape
        valid = valid_items(actions)
        k = n_embeddings(valid.sum(1), self.k_max, self.k_rule, self.fixed_k)
        active = torch.arange(self.k_max)[None, :] < k[:, None]  # (B, K)
        se = self.S(self.summ(x, actions))  # (B, L, d)
        vf = valid[..., None].to(se.dtype)
        if self.init == "maxmin":
            idx = self._maxmin(se, valid)
            c = torch.gather(se, 1, idx[..., None].expand(-1, -1, se.shape[-1]))  # (B, K, d)
            b = se @ c.transpose(1, 2)
        else:
            b = self.b0[:L][None].expand(B, -1, -1)
        w = b
        for _ in range(self.iterations):
            logits = b.masked_fill(~active[:, None, :], float("-inf"))
            if self.assignment == "single":
                w = F.one_hot(logits.argmax(-1), self.k_max).to(se.dtype)
            else:
                w = torch.softmax(logits, dim=-1)
            w = w * vf
            c = squash(w.transpose(1, 2) @ se)  # (B, K, d)
            b = se @ c.transpose(1, 2)
        importance = w.sum(1) * active
        assign = torch.where(valid, w.argmax(-1), torch.full_like(actions, -1))
        return _finish(Clusters(c * active[..., None], active, importance, assign), self.drop_empty)


class SelfAttentionInterests(nn.Module):
    """ComiRec-SA: K attention heads over the summarised history."""

    def __init__(self, item_dim: int, d: int, k_max: int = 7, k_rule: str = "log2", fixed_k: int = 4,
                 drop_empty: bool = False):
        super().__init__()
        self.summ = ItemSummariser(item_dim, d)
        self.w1 = nn.Linear(d, 4 * d)
        self.w2 = nn.Linear(4 * d, k_max, bias=False)
        self.k_max, self.k_rule, self.fixed_k, self.drop_empty = k_max, k_rule, fixed_k, drop_empty

    def forward(self, x: torch.Tensor, actions: torch.Tensor) -> Clusters:
        valid = valid_items(actions)
        k = n_embeddings(valid.sum(1), self.k_max, self.k_rule, self.fixed_k)
        active = torch.arange(self.k_max)[None, :] < k[:, None]
        e = self.summ(x, actions)
        a = self.w2(torch.tanh(self.w1(e)))  # (B, L, K)
        att = torch.softmax(a.masked_fill(~valid[..., None], float("-inf")), dim=1)
        att = torch.nan_to_num(att, nan=0.0)  # a user with no valid item: no attention
        c = att.transpose(1, 2) @ e  # (B, K, d)
        head = a.masked_fill(~active[:, None, :], float("-inf")).argmax(-1)  # each item's strongest active head
        own = F.one_hot(head, self.k_max).to(e.dtype) * valid[..., None].to(e.dtype)
        importance = own.sum(1) * active
        assign = torch.where(valid, head, torch.full_like(actions, -1))
        return _finish(Clusters(c * active[..., None], active, importance, assign), self.drop_empty)


def nearest_embedding(queries: torch.Tensor, active: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Training's argmax association: for each row the active query scoring highest against the
    row's target pin. queries (B, K, Dq) (the first D columns are the embedding), active (B, K),
    target (B, D) -> (B, Dq)."""
    d = target.shape[1]
    s = (queries[..., :d] * target[:, None, :]).sum(-1).masked_fill(~active, float("-inf"))
    return queries[torch.arange(queries.shape[0]), s.argmax(1)]


def make_extractor(kind: str, item_dim: int, d: int, m) -> nn.Module:
    """The cluster extractor of `model.user_embeddings` (kind), sizes from `model.multi` (m)."""
    if kind == "capsule":
        return CapsuleRouting(item_dim, d, m.k_max, m.iterations, m.init, m.assignment, m.k_rule, m.fixed_k,
                              drop_empty=m.drop_empty)
    if kind == "mind":
        return CapsuleRouting(item_dim, d, m.k_max, m.iterations, "random", "soft", m.k_rule, m.fixed_k,
                              drop_empty=m.drop_empty)
    if kind == "self_attention":
        return SelfAttentionInterests(item_dim, d, m.k_max, m.k_rule, m.fixed_k, m.drop_empty)
    raise ValueError(f"unknown user_embeddings {kind!r}; available: single, capsule, mind, self_attention")
