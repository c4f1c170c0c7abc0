"""The temporal split's validation window: 2% of the training period by default, widened until it
holds enough warm users with a validation target, counted as evaluation counts them."""

from __future__ import annotations

import logging

import numpy as np

from ebr.config import FeaturesConfig
from ebr.data.importers import import_interactions
from ebr.data.splits import MAX_VAL_FRACTION, Part, make_temporal
from ebr.features.examples import eval_spec, load_engagements
from ebr.features.state import build_feature_state
from ebr.workspace import Workspace


def _world(tmp_path) -> Workspace:
    """Days 0..100 (cut at day 80 with a 20% test; a window of f covers [80 - 80 f, 80)): nine warm
    users with a target at day 79 (inside 2%), a tenth at day 76.2 (inside 5%, not 4%; shown its
    target before, which does not make it a training pin), and one decoy of each
    kind evaluation does not count, all at day 79: a cold user, a user seen before only in an
    impression, a repeat of a training pin, a warm user's impression."""
    rows = ["user_id,item_id,ts,action", "first,p0,2026-01-01T00:00:00Z,click", "last,p0,2026-04-11T00:00:00Z,click"]
    for u in range(9):
        rows += [f"w{u},old{u},2026-01-02T00:00:00Z,click", f"w{u},new{u},2026-03-21T00:00:00Z,save"]  # day 79
    rows += ["w9,new9,2026-01-03T00:00:00Z,impression"]
    rows += ["seen,s0,2026-01-02T00:00:00Z,impression", "seen,s1,2026-03-21T00:00:00Z,click"]
    rows += ["w9,old9,2026-01-02T00:00:00Z,click", "w9,new9,2026-03-18T04:48:00Z,click"]  # day 76.2
    rows += ["cold,c1,2026-03-21T00:00:00Z,click",
             "rep,r1,2026-01-02T00:00:00Z,click", "rep,r1,2026-03-21T00:00:00Z,save",
             "imp,i0,2026-01-02T00:00:00Z,click", "imp,i1,2026-03-21T00:00:00Z,impression"]
    csv = tmp_path / "x.csv"
    csv.write_text("\n".join(rows) + "\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, csv)
    return ws


def test_validation_window_widens_to_the_least_share_holding_the_users(tmp_path, caplog):
    """Mutations caught: counting non-positive actions, cold users, users seen only in impressions
    or repeats of a training pin (each decoy makes ten at 2%: the window stays at 2%); an earlier
    impression read as a training engagement (the user seen only in an impression makes ten at 2%); `>` for `>=`
    (goes past 5%); never widening (2%); an explicit share widened too; the cap's warning dropped.
    The count is evaluation's (eval_spec's warm users of the validation part)."""
    ws = _world(tmp_path)
    sp = make_temporal(ws, min_val_users=10)
    assert sp.manifest["val_fraction"] == 0.05 and sp.manifest["val_users"] == 10
    # the tenth user's target is a validation engagement of the split the training loop reads
    fs = build_feature_state(ws)
    e = load_engagements(ws, fs, sp)
    w9 = fs.users.encode(["w9"])[0]
    new9 = fs.pins.encode(["new9"])[0]
    assert e.part[(e.user == w9) & (e.pin == new9)].tolist() == [Part.TRAIN, Part.VALIDATION]  # shown, then clicked
    assert len(eval_spec(e, FeaturesConfig(), Part.VALIDATION, (Part.TRAIN,)).users) == 10

    exact = make_temporal(ws, name="exact", val_fraction=0.02, min_val_users=10)
    assert exact.manifest["val_fraction"] == 0.02 and exact.manifest["val_users"] == 9
    with caplog.at_level(logging.WARNING, logger="ebr"):
        capped = make_temporal(ws, name="capped", min_val_users=11)
    assert capped.manifest["val_fraction"] == MAX_VAL_FRACTION and capped.manifest["val_users"] == 10
    assert any("noisy" in r.message for r in caplog.records)
    assert np.isclose((sp.cut - sp.val_cut).total_seconds() / 86400, 80 * 0.05)
