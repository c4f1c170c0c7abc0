"""Multi-embedding users: clustering of the history (model/interests.py) and the merges (serve/merge.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebr.config import MultiConfig
from ebr.model.interests import (
    CapsuleRouting,
    SelfAttentionInterests,
    make_extractor,
    n_embeddings,
    nearest_embedding,
)
from ebr.ranking import max_over_embeddings, topk_masked
from ebr.serve.merge import max_merge, quotas, round_robin

HIDE = 5


def _groups(sizes=(5, 3, 2), d=8, seed=0):
    """History items in well-separated groups: (1, L, d) item features, group of each item."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), d, generator=g) * 5
    rows, groups = [], []
    for j, n in enumerate(sizes):
        rows.append(centres[j] + 0.01 * torch.randn(n, d, generator=g))
        groups += [j] * n
    return torch.cat(rows)[None], np.array(groups)


def test_maxmin_picks_the_medoid_then_one_centre_per_group():
    """Mutations caught: argmax instead of argmin in the maxmin step (two centres in one group), the
    first centre taken as item 0 / the most recent item instead of the medoid (the largest group's),
    invalid items eligible as centres."""
    x, groups = _groups((3, 5, 2))
    m = CapsuleRouting(8, 8, k_max=3)
    valid = torch.ones(1, x.shape[1], dtype=torch.bool)
    picks = m._maxmin(x, valid)[0].tolist()
    assert groups[picks[0]] == 1, "the medoid (largest group) comes first"
    assert sorted(groups[picks].tolist()) == [0, 1, 2], "one centre per group"
    valid[0, groups == 2] = False  # that group's items are padding/hides: never a centre
    picks = m._maxmin(x, valid)[0, :2].tolist()
    assert sorted(groups[picks].tolist()) == [0, 1]


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 1), (3, 2), (5, 3), (8, 3), (9, 4), (64, 6), (200, 7)])
def test_k_rule_log2(n, expected):
    """K = clamp(ceil(log2 L), 1, K_max). Mutations caught: floor instead of ceil, no clamp."""
    assert expected == max(1, min(7, math.ceil(math.log2(max(n, 1)))))
    assert int(n_embeddings(torch.tensor([n]), 7)[0]) == expected
    assert int(n_embeddings(torch.tensor([n]), 7, "fixed", 4)[0]) == max(1, min(4, n))


def _history(L=12, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 16, generator=g)
    a = torch.randint(1, 5, (B, L), generator=g)
    a[0, :3] = 0  # padding
    a[0, 5] = HIDE
    return x, a


@pytest.mark.parametrize("kind", ["capsule", "mind", "self_attention"])
def test_clusters_are_ordered_and_assignments_follow_the_order(kind):
    """Importance non-increasing over the active clusters, inactive clusters empty, and each item's
    cluster index points at the reordered cluster. Mutations caught: the reorder not applied to the
    assignments, invalid items (padding, hides) assigned, K not taken from the valid length."""
    torch.manual_seed(0)
    m = make_extractor(kind, 16, 8, MultiConfig())
    x, a = _history()
    c = m(x, a)
    valid = (a > 0) & (a != HIDE)
    assert c.active.sum(1).tolist() == n_embeddings(valid.sum(1), 7).tolist()  # drop_empty off by default
    assert (c.assign[~valid] == -1).all() and (c.assign[valid] >= 0).all()
    for b in range(2):
        k = int(c.active[b].sum())
        imp = c.importance[b]
        assert (imp[:k][:-1] >= imp[:k][1:] - 1e-6).all() and (imp[k:] == 0).all()
        assert (c.assign[b][valid[b]] < k).all()
        assert (c.vectors[b, k:] == 0).all()
        if kind != "mind":  # hard assignments: importance counts the items of each cluster
            counts = torch.bincount(c.assign[b][valid[b]], minlength=7).float()
            assert torch.equal(counts, imp)


@pytest.mark.parametrize("kind", ["capsule", "self_attention"])
def test_empty_clusters_are_dropped_unless_asked_to_keep(kind):
    """Hard routing can leave a cluster empty; it is no embedding (drop_empty), but K follows the
    rule exactly with drop_empty off, and a user without valid items keeps one embedding.
    Mutations caught: drop_empty ignored, a user left with no embedding."""
    torch.manual_seed(0)
    x, a = _history(L=40, B=6, seed=5)
    a[5] = 0  # no history at all
    keep = make_extractor(kind, 16, 8, MultiConfig(drop_empty=False))
    drop = make_extractor(kind, 16, 8, MultiConfig(drop_empty=True))
    drop.load_state_dict(keep.state_dict())
    ck, cd = keep(x, a), drop(x, a)
    valid = (a > 0) & (a != HIDE)
    assert ck.active.sum(1).tolist() == n_embeddings(valid.sum(1), 7).tolist()
    empty = (ck.importance == 0) & ck.active
    assert empty[:5].any(), "the untrained routing leaves some cluster empty (else this test shows nothing)"
    assert (cd.active.sum(1) == (ck.active & ~empty).sum(1).clamp(min=1)).all()
    assert (cd.importance[cd.active][:-1] > 0).all(), "a kept embedding has history items routed to it"
    assert cd.active[5].tolist() == [True] + [False] * 6


def test_single_assignment_counts_items_soft_does_not():
    """Single assignment: each item contributes to one cluster only, so importance is a count;
    soft routing spreads it. Mutation caught: the single-assignment switch ignored."""
    torch.manual_seed(0)
    x, a = _history()
    hard = CapsuleRouting(16, 8, assignment="single")(x, a)
    torch.manual_seed(0)
    soft = CapsuleRouting(16, 8, assignment="soft")(x, a)
    assert torch.equal(hard.importance, hard.importance.round())
    assert not torch.equal(soft.importance, soft.importance.round())


@pytest.mark.parametrize("kind", ["capsule", "mind", "self_attention"])
def test_invalid_items_do_not_change_the_clusters(kind):
    """A hidden or padded item's features never reach a cluster. Mutation caught: the validity mask
    dropped from routing/attention (or hides counted as valid)."""
    torch.manual_seed(0)
    m = make_extractor(kind, 16, 8, MultiConfig())
    x, a = _history()
    before = m(x, a)
    x2 = x.clone()
    x2[0, 5] += 100.0  # the hidden item
    x2[0, :3] -= 50.0  # padding slots
    after = m(x2, a)
    assert torch.allclose(before.vectors, after.vectors, atol=1e-5)
    assert torch.equal(before.assign, after.assign)


def test_self_attention_and_capsule_export_stays_exact():
    """The extractors run under torch.export (the bundle's user tower) with the same answers."""
    for m in (CapsuleRouting(16, 8), SelfAttentionInterests(16, 8)):
        x, a = _history(B=3)
        ep = torch.export.export(m, (x, a), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},) * 2)
        got, want = ep.module()(x, a), m(x, a)
        assert all(torch.allclose(p, q) for p, q in zip(got, want))


def test_training_association_picks_the_best_active_embedding():
    """Mutations caught: always embedding 0, inactive embeddings eligible, argmin."""
    q = torch.tensor([[[1.0, 0.0, 9.0], [0.0, 1.0, 8.0], [0.7, 0.7, 7.0]],
                      [[1.0, 0.0, 6.0], [0.0, 1.0, 5.0], [-1.0, 0.0, 4.0]]])
    active = torch.tensor([[True, True, True], [True, False, False]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    got = nearest_embedding(q, active, target)
    assert got.tolist() == [[0.0, 1.0, 8.0], [1.0, 0.0, 6.0]]


def test_quotas():
    """Mutations caught: the remainder lost (sum below k), importance ignored."""
    assert quotas(10, None, 3).tolist() == [4, 3, 3]
    assert quotas(10, np.array([6.0, 3.0, 1.0]), 3).tolist() == [6, 3, 1]
    assert quotas(10, np.array([2.0, 1.0, 0.0]), 3).tolist() == [7, 3, 0]
    assert quotas(7, np.zeros(3), 3).tolist() == [3, 2, 2]
    assert quotas(0, None, 2).tolist() == [0, 0]


def test_round_robin_dedups_and_refills_under_the_budget():
    """Mutations caught: duplicates kept, quotas ignored, a list that runs dry leaves slots empty."""
    a = (np.array([1, 2, 3, 4, 5]), np.array([0.9, 0.8, 0.7, 0.6, 0.5]))
    b = (np.array([2, 6, -1, -1, -1]), np.array([0.95, 0.4, -np.inf, -np.inf, -np.inf]))
    c = (np.array([7, 8, 9, 10, 11]), np.array([0.3, 0.2, 0.1, 0.0, -0.1]))
    codes, scores, src = round_robin([a, b, c], 5)
    assert codes.tolist() == [1, 2, 7, 3, 6]  # a, b (its 2 before a's), c, a, b
    assert src.tolist() == [0, 1, 2, 0, 1] and scores[1] == pytest.approx(0.95)
    codes, _, src = round_robin([a, b, c], 9)
    assert len(codes) == 9 == len(set(codes.tolist())) and src.tolist().count(1) == 2  # b ran dry, the others refill
    codes, _, src = round_robin([a, b, c], 6, np.array([4, 1, 1]))
    assert codes.tolist() == [1, 2, 7, 3, 4, 5] and src.tolist() == [0, 1, 2, 0, 0, 0]


def test_max_merge_is_the_exact_top_k_by_max_over_embeddings():
    """With each embedding's exact top k, the merge equals the dense top k of max-over-embeddings
    scores (EVALUATION.md's offline multi score). Mutations caught: round-robin instead of max,
    duplicates kept, the first list's score kept instead of the best."""
    g = torch.Generator().manual_seed(3)
    items = torch.randn(300, 8, generator=g)
    q = torch.randn(4, 3, 8, generator=g)
    active = torch.tensor([[True] * 3, [True, True, False], [True, False, False], [True] * 3])
    dense_s, dense_i = topk_masked(max_over_embeddings(q, active, items), 20)
    for b in range(4):
        lists = []
        for j in range(int(active[b].sum())):
            s, i = torch.topk(q[b, j] @ items.T, 20)
            lists.append((i.numpy(), s.numpy()))
        codes, scores, _ = max_merge(lists, 20)
        assert codes.tolist() == dense_i[b].tolist()
        assert np.allclose(scores, dense_s[b].numpy(), atol=1e-5)
