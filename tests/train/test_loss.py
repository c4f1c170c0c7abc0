"""The loss against numbers worked out by hand, including the sign of the logQ correction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebr.train.loss import FrequencyEstimator, inclusion_log_prob, sampled_softmax_logq

# 3x3 batch, embeddings chosen so that the logits are simple numbers
U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
IDS = torch.tensor([10, 11, 12])
LOG_Q = torch.log(torch.tensor([0.5, 0.1, 0.2]))
TAU = 0.5


def _by_hand(sign: float = -1.0, mask_col: dict | None = None) -> float:
    """Loss written out element by element: logit_ij = u_i.v_j / tau + sign * log q_j."""
    dots = [[1.0, 0.0, 0.8], [0.0, 1.0, 0.6], [0.6, 0.8, 0.96]]
    q = [0.5, 0.1, 0.2]
    total = 0.0
    for i in range(3):
        logits = [dots[i][j] / TAU + sign * math.log(q[j]) for j in range(3)]
        cols = [j for j in range(3) if j == i or not (mask_col and j in mask_col.get(i, ()))]
        denom = sum(math.exp(logits[j]) for j in cols)
        total += -(logits[i] - math.log(denom))
    return total / 3


def test_matches_hand_computed_value():
    got = float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU))
    assert got == pytest.approx(_by_hand(), abs=1e-6)
    # worked on paper: row losses 1.2097, 0.2245, 0.9735 -> mean 0.80257
    assert got == pytest.approx(0.80257, abs=1e-4)


def test_sign_of_correction():
    """Subtracting log q (correct) and adding it (the classic bug) give different losses; only
    the subtraction matches the hand computation."""
    right = float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU))
    wrong = float(sampled_softmax_logq(U, V, IDS, -LOG_Q, TAU))
    assert right == pytest.approx(_by_hand(-1.0), abs=1e-6)
    assert wrong == pytest.approx(_by_hand(+1.0), abs=1e-6)
    # on paper, adding log q: row losses 0.2588, 0.9460, 0.9477 -> mean 0.71750
    assert wrong == pytest.approx(0.71750, abs=1e-4) and right != pytest.approx(wrong, abs=0.05)
    # a frequent item (high q) as a negative gets a lower logit, so it hurts less
    no_corr = float(sampled_softmax_logq(U, V, IDS, None, TAU))
    assert no_corr == pytest.approx(_by_hand(0.0), abs=1e-6)


def test_accidental_hits_masked_and_weights():
    ids = torch.tensor([10, 11, 10])  # rows 0 and 2 share an item: column 2 is a hit for row 0 and vice versa
    got = float(sampled_softmax_logq(U, V, ids, LOG_Q, TAU))
    assert got == pytest.approx(_by_hand(mask_col={0: (2,), 2: (0,)}), abs=1e-6)
    # weighted: -(1/B) sum_i w_i log softmax_i, with weights that do not sum to B
    # (mutation caught: normalising by the sum of the weights)
    w = torch.tensor([3.0, 0.5, 1.0])
    ref = _rows(LOG_Q)
    want = (3 * ref[0] + 0.5 * ref[1] + ref[2]) / 3
    assert float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU, w)) == pytest.approx(want, abs=1e-6)


def test_same_user_positives_are_no_negatives():
    """train.mask_same_user: rows 0 and 2 of one user, row 1 of another: column 2 leaves row 0's
    softmax and column 0 row 2's, each row keeps its own; the mask a step builds from the
    examples' users, for a rank's chunk of rows. Mutations caught: the mask ignored, the row's own
    column masked too (an infinite loss), the chunk's rows taken from the start of the batch."""
    from types import SimpleNamespace

    from ebr.train.loop import same_user_columns

    users = np.array([7, 8, 7])
    d = SimpleNamespace(examples=SimpleNamespace(user=np.array([5, 7, 8, 7, 9])))
    full = same_user_columns(d, SimpleNamespace(idx=np.array([1, 2, 3]), off=0, size=3))
    assert torch.equal(full, torch.from_numpy(users[:, None] == users[None, :]))
    got = float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU, exclude=full))
    assert got == pytest.approx(_by_hand(mask_col={0: (2,), 2: (0,)}), abs=1e-6)
    assert same_user_columns(d, SimpleNamespace(idx=np.array([1, 2, 3]), off=1, size=1)).tolist() == \
        [[False, True, False]]
    chunk = same_user_columns(d, SimpleNamespace(idx=np.array([1, 2, 3]), off=2, size=1))
    assert chunk.tolist() == [[True, False, True]]
    one = float(sampled_softmax_logq(U[2:], V, IDS, LOG_Q, TAU, exclude=chunk, row_offset=2, norm=3))
    assert one == pytest.approx(_by_hand(mask_col={2: (0,)}) - (_rows(LOG_Q)[0] + _rows(LOG_Q)[1]) / 3, abs=1e-6)


def _rows(log_q: torch.Tensor) -> list[float]:
    logits = U @ V.T / TAU - log_q[None, :]
    return (-torch.log_softmax(logits, 1).diagonal()).tolist()


def test_mixed_negatives_and_gradient():
    neg = torch.tensor([[0.0, -1.0]])
    nid = torch.tensor([99])
    nlq = torch.tensor([math.log(0.01)])
    got = float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU, neg=neg, neg_ids=nid, neg_log_q=nlq))
    logits = torch.cat([U @ V.T / TAU - LOG_Q[None, :], U @ neg.T / TAU - nlq[None, :]], 1)
    assert got == pytest.approx(float((-torch.log_softmax(logits, 1)[range(3), range(3)]).mean()), abs=1e-6)
    # a sampled negative equal to a row's positive is masked for that row
    hit = float(sampled_softmax_logq(U, V, IDS, LOG_Q, TAU, neg=V[:1], neg_ids=IDS[:1], neg_log_q=nlq))
    logits = torch.cat([U @ V.T / TAU - LOG_Q[None, :], U @ V[:1].T / TAU - nlq[None, :]], 1)
    logits[0, 3] = float("-inf")
    assert hit == pytest.approx(float((-torch.log_softmax(logits, 1)[range(3), range(3)]).mean()), abs=1e-6)
    u = U.clone().requires_grad_(True)
    sampled_softmax_logq(u, V, IDS, LOG_Q, TAU).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_frequency_estimator_by_hand():
    """Warm start: the mean of the gaps until 1/alpha sightings, then the moving average; the first
    gap runs from step 0. Mutation caught: the old cold start (B = alpha * t at first sight)."""
    est = FrequencyEstimator(buckets=1 << 16, hashes=2, alpha=0.25)
    a, b = torch.tensor([1]), torch.tensor([2])
    for step in (2, 3, 7, 8):
        est.update(a, step)
    est.update(torch.tensor([1, 2, 1]), 12)  # duplicates within a batch count once
    # a: gaps 2, 1, 4, 1 -> means 2, 1.5, 7/3, 2 (a = 1/C while 1/C >= alpha); then 0.75*2 + 0.25*4 = 2.5
    assert float(est.log_prob(a)) == pytest.approx(-math.log(2.5), abs=1e-6)
    # b: first seen at step 12 -> its gap estimate is 12 steps (not alpha * 12 = 3)
    assert float(est.log_prob(b)) == pytest.approx(-math.log(12.0), abs=1e-6)


def test_frequency_estimator_takes_the_max_over_hashes():
    """Item x shares its bucket with a frequent item y under hash 0 only: hash 1 sees x's own gap.
    Mutation caught: min (or mean) over hashes, which lets the collision inflate p(x)."""
    est = FrequencyEstimator(buckets=64, hashes=2, alpha=0.05, seed=3)
    h = est._hash(torch.arange(2, 5000))
    y = 2
    x = next(int(i) + 2 for i in range(1, h.shape[1]) if h[0, i] == h[0, 0] and h[1, i] != h[1, 0])
    for t in range(1, 401):
        est.update(torch.tensor([y] + ([x] if t % 10 == 0 else [])), t)
    assert float(est.log_prob(torch.tensor([x]))) == pytest.approx(-math.log(10.0), abs=0.05)
    assert float(est.log_prob(torch.tensor([y]))) == pytest.approx(0.0, abs=1e-6)


def test_exact_inclusion_probability():
    """p_j = 1 - (1 - n_j/N)^B, by hand for two items."""
    counts = np.array([0, 0, 10, 990])
    lp = inclusion_log_prob(counts, 4)
    assert float(lp[2]) == pytest.approx(math.log(1 - (1 - 10 / 1000) ** 4), abs=1e-6)
    assert float(lp[3]) == pytest.approx(math.log(1 - (1 - 990 / 1000) ** 4), abs=1e-6)


def test_frequency_estimator_converges():
    """Items seen every 1, 4 and 20 steps: estimated p -> 1, 1/4, 1/20."""
    est = FrequencyEstimator(buckets=1 << 18, hashes=3, alpha=0.05)
    for t in range(1, 2001):
        ids = [7] + ([8] if t % 4 == 0 else []) + ([9] if t % 20 == 0 else [])
        est.update(torch.tensor(ids), t)
    p = est.log_prob(torch.tensor([7, 8, 9])).exp()
    assert p.tolist() == pytest.approx([1.0, 0.25, 0.05], rel=0.05)


def test_train_step_passes_the_same_user_mask(tiny_ws, monkeypatch):
    """The training step hands the loss the same-user mask when train.mask_same_user is on, and
    none when off. Mutation caught: the setting not wired into the step."""
    from ebr.config import RunConfig
    from ebr.train import loop

    seen = []
    real = loop.sampled_softmax_logq
    monkeypatch.setattr(loop, "sampled_softmax_logq", lambda *a, **k: seen.append(k["exclude"]) or real(*a, **k))
    for on in (True, False):
        cfg = RunConfig.load(None, {"train.batch_size": 256, "model.hidden": [16], "train.mask_same_user": on})
        d = loop.prepare(tiny_ws, cfg)
        s = loop.TrainState.fresh(cfg, d.sizes, positives=d.positives())
        idx = np.arange(256)
        b = loop.assemble(d, cfg, idx, 1, s.ranks)
        log_q = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), 256)
        loop.train_step(s, d, cfg, idx, log_q, None, b)
        if on:
            assert torch.equal(seen[-1], loop.same_user_columns(d, b)) and seen[-1].sum() > 256
        else:
            assert seen[-1] is None
