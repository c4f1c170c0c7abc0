"""train.recency_half_life_days: each training example's loss weight decays with its age."""

from __future__ import annotations

import numpy as np
import pytest

from ebr.config import RunConfig
from ebr.features.examples import recency_weights
from ebr.train.loop import prepare
from tests.data.test_given_split import _adjacency

DAY = 86400 * 10**6


def test_weights_halve_per_half_life_and_average_one():
    """An example one half-life older weighs half as much, two half-lives a quarter; the weights
    average 1 (so the loss scale and step size stay those of unweighted data). Catches the sign
    flipped (older examples heavier), the rescaling dropped, and the half-life read in
    microseconds instead of days."""
    as_of = 100 * DAY
    w = recency_weights(np.array([as_of, as_of - 7 * DAY, as_of - 14 * DAY]), as_of, 7.0)
    assert w.dtype == np.float32
    assert w[1] / w[0] == pytest.approx(0.5) and w[2] / w[0] == pytest.approx(0.25)
    assert w.mean() == pytest.approx(1.0)


def test_training_examples_are_weighted_by_age_in_both_phases(tiny_ws):
    """On timed data, prepare() multiplies each training example's action weight by 2^(-age /
    half-life) (rescaled): the ratio to the unweighted run's weight follows the examples' times,
    in selection and in the refit (which adds the validation window's examples); without the
    setting the weights are the action weights. Catches the setting ignored in either phase, the
    weights replacing the action weights instead of multiplying them, and ages read from the
    wrong field (the example's user or pin instead of its time)."""
    for refit in (False, True):
        plain = prepare(tiny_ws, RunConfig.load(None, {}), refit=refit).examples
        d = prepare(tiny_ws, RunConfig.load(None, {"train.recency_half_life_days": 3.0}), refit=refit)
        ex = d.examples
        assert np.array_equal(ex.t, plain.t) and np.array_equal(ex.pin, plain.pin)
        assert len(np.unique(plain.weight)) > 1  # action weights differ: the test sees a multiplication
        ratio = ex.weight / plain.weight
        expected = np.exp2(-(d.as_of - ex.t.astype(np.float64)) / (3.0 * DAY))
        np.testing.assert_allclose(ratio / ratio.max(), expected / expected.max(), rtol=1e-4, atol=1e-7)
        assert ex.t.max() - ex.t.min() > 6 * 3.0 * DAY  # the weights span more than a factor 64
        assert ratio.max() / ratio.min() > 64


def test_data_without_real_time_is_not_weighted(tmp_path):
    """A given split's pseudo-time (the file order) is no age: the setting leaves the weights as
    they are, even at a half-life so short that any weighting of file positions would change them.
    Catches the timed check dropped (weights decaying with the row's file position)."""
    ws = _adjacency(tmp_path)
    plain = prepare(ws, RunConfig.load(None, {})).examples
    ex = prepare(ws, RunConfig.load(None, {"train.recency_half_life_days": 1e-9})).examples
    assert np.array_equal(ex.weight, plain.weight)
