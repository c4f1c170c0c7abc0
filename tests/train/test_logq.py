"""The logQ correction as training uses it: estimates that match the true inclusion probability,
and the right sign at the call site in the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ebr.train.loop as loop
from ebr.config import NO_CHOICE, RunConfig
from ebr.train.loss import FrequencyEstimator, inclusion_log_prob


@pytest.fixture(scope="module")
def small_examples(small_ws):
    cfg = RunConfig.load(None, {})
    return loop.prepare(small_ws, cfg).examples, cfg.train.batch_size


def test_estimates_match_true_inclusion_probability_per_frequency_decile(small_examples):
    """Small world, one epoch of the loop's own batch order: for items seen at least 20 times, the
    mean estimated log p of each frequency decile is within 0.2 of the true mean, true p = 1 - (1 -
    n/N)^B. Mutation caught: the streaming estimator's old cold start (B = alpha * t at first sight:
    a decile spread of 0.36-0.9 against a true 2.6); the warm start reads only the batches."""
    ex, B = small_examples
    P = int(ex.pin.max()) + 1
    counts = np.bincount(ex.pin, minlength=P)
    truth = inclusion_log_prob(counts, B).numpy()
    est = FrequencyEstimator(hashes=2, alpha=0.01, seed=0)
    perm = loop.epoch_order(ex, B, seed=0, epoch=0, time_local=False)
    for step, lo in enumerate(range(0, len(perm), B), start=1):
        est.update(torch.from_numpy(ex.pin[perm[lo: lo + B]]), step)
    items = np.flatnonzero(counts >= 20)
    assert len(items) > 1000
    streaming = est.log_prob(torch.from_numpy(items)).numpy()
    exact = inclusion_log_prob(counts, B).numpy()[items]
    # deciles of frequency among all items with a count (the seen-20-times filter applies inside)
    seen = np.flatnonzero(counts > 0)
    edges = np.quantile(counts[seen], np.linspace(0, 1, 11))
    dec = np.clip(np.searchsorted(edges, counts[items], side="right") - 1, 0, 9)
    for d in np.unique(dec):
        m = dec == d
        true_mean = truth[items[m]].mean()
        assert abs(streaming[m].mean() - true_mean) < 0.2, (d, streaming[m].mean(), true_mean)
        assert abs(exact[m].mean() - true_mean) < 0.2
    spread = truth[items].max() - truth[items].min()
    assert streaming.max() - streaming.min() > 0.7 * spread, "the estimates must span the true range"


@pytest.mark.parametrize("estimator", ["exact", "streaming"])
def test_training_loop_subtracts_log_p(tiny_ws, monkeypatch, estimator):
    """The loop hands the loss log p of each batch's positives (log p <= 0, equal to the chosen
    estimator's value), which the loss subtracts. Mutations caught: flipping the sign at the call
    site, passing the streaming estimate when exact is configured, or no correction at all."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = loop.sampled_softmax_logq

    def spy(user, item, item_ids, log_q, *args, **kw):
        seen.append((item_ids.clone(), None if log_q is None else log_q.clone()))
        return real(user, item, item_ids, log_q, *args, **kw)

    monkeypatch.setattr(loop, "sampled_softmax_logq", spy)
    cfg = RunConfig.load(None, {"train.max_steps": 3, "train.epochs": 1, "model.hidden": [16], "train.refit": False,
                                "train.logq_estimator": estimator, **NO_CHOICE})
    loop.train(tiny_ws, cfg, run=f"logq-{estimator}", progress=False)
    assert len(seen) == 3 and all(lq is not None for _, lq in seen)
    if estimator == "exact":
        d = loop.prepare(tiny_ws, cfg)
        table = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), cfg.train.batch_size)
        for ids, lq in seen:
            assert torch.allclose(lq, table[ids]), "log q must be log p of the batch's positives"
    assert all((lq <= 0).all() for _, lq in seen) and (seen[-1][1] < -0.5).any(), "log p of a positive is negative"
    cfg_off = RunConfig.load(None, {"train.max_steps": 1, "train.epochs": 1, "model.hidden": [16], "train.logq": False})
    seen.clear()
    loop.train(tiny_ws, cfg_off, run="logq-off", progress=False)
    assert seen[0][1] is None
