"""train.user_weight_power: each training example's loss weight times n_u^-power."""

from __future__ import annotations

import numpy as np
import pytest

from ebr.config import RunConfig
from ebr.features.examples import user_weights
from ebr.train.loop import prepare


def test_power_one_gives_every_user_the_same_total_and_weights_average_one():
    """Four examples of one user and one of another: at power 1 each user's examples sum to the same
    weight, at 0.5 the heavy user's example weighs (4/1)^-0.5 = half the light one's, at 0 all are
    equal; the weights average 1 (the loss scale stays that of unweighted data). Catches the sign
    flipped (heavy users heavier), the rescaling dropped, and counts taken over the whole array
    instead of per user."""
    users = np.array([7, 7, 3, 7, 7])
    w = user_weights(users, 1.0)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0)
    assert w[users == 7].sum() == pytest.approx(w[users == 3].sum())
    half = user_weights(users, 0.5)
    assert half[0] / half[2] == pytest.approx(0.5)
    np.testing.assert_allclose(user_weights(users, 0.0), np.ones(5))


def test_training_examples_are_weighted_per_user_in_both_phases(tiny_ws):
    """prepare() multiplies each example's action weight by its user's weight, in selection and in
    the refit (which adds the validation window's examples and so changes the counts): at power 1
    the ratio to the unweighted run sums to the same total for every user. Catches the setting
    ignored in either phase, the weights replacing the action weights instead of multiplying them,
    and users counted by the example's pin."""
    for refit in (False, True):
        plain = prepare(tiny_ws, RunConfig.load(None, {}), refit=refit).examples
        ex = prepare(tiny_ws, RunConfig.load(None, {"train.user_weight_power": 1.0}), refit=refit).examples
        assert np.array_equal(ex.user, plain.user) and np.array_equal(ex.pin, plain.pin)
        assert len(np.unique(plain.weight)) > 1  # action weights differ: the test sees a multiplication
        counts = np.bincount(ex.user)
        assert counts[counts > 0].max() > 2 * counts[counts > 0].min()  # users differ in activity
        totals = np.bincount(ex.user, weights=ex.weight / plain.weight)[counts > 0]
        np.testing.assert_allclose(totals, totals[0], rtol=1e-4)


def test_first_day_weight_by_hand_and_in_training(tiny_ws):
    """train.first_day_weight: an example within a day of its user's first example (strictly
    before first + 1 day) weighs `weight` against 1 for later ones, rescaled to mean 1; the first
    time is each user's own, whatever the rows' order; prepare() multiplies the action weights by
    it on data with real time. Mutations caught: <= at the day's edge, one first time for all
    users, the weights inverted (later examples light), the rescaling dropped, the setting ignored
    by prepare()."""
    from ebr.features.examples import first_day_weights

    day = 86400 * 10**6
    users = np.array([1, 1, 2, 1, 2, 2])
    t = np.array([2 * day, day // 2, 9 * day, 0, 10 * day, 9 * day + day // 3])
    w = first_day_weights(users, t, 0.25, day_us=day)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w / w[0], [1, 0.25, 0.25, 0.25, 1, 0.25])
    plain = prepare(tiny_ws, RunConfig.load(None, {})).examples
    cfg = RunConfig.load(None, {"train.first_day_weight": 0.5})
    ex = prepare(tiny_ws, cfg).examples
    want = first_day_weights(plain.user, plain.t, 0.5)
    assert len(np.unique(want)) == 2  # the fixture has first-day and later examples
    np.testing.assert_allclose(ex.weight, plain.weight * want, rtol=1e-5)

