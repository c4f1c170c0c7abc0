"""Everything an example sees is computed from data strictly before its timestamp."""

from __future__ import annotations

import numpy as np

from ebr.config import FeaturesConfig
from ebr.data.importers import import_interactions
from ebr.data.splits import make_temporal
from ebr.features.examples import Histories, load_engagements, positive_examples
from ebr.features.state import ACTION_CODE, build_feature_state
from ebr.workspace import Workspace


def test_planted_future_engagement_never_reaches_features(tmp_path):
    rows = ["user_id,item_id,ts,action"]
    for d in range(1, 29):  # user a: one pin a day, plus one hide
        rows.append(f"a,p{d},2026-01-{d:02d}T12:00:00Z,click")
    rows.append("a,h1,2026-01-10T13:00:00Z,hide")
    rows.append("a,imp,2026-01-11T13:00:00Z,impression")
    rows.append("a,FUTURE,2026-01-20T12:00:00Z,save")  # planted: same time as p20, later than p1..p19
    csv = tmp_path / "x.csv"
    csv.write_text("\n".join(rows) + "\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, csv)
    split = make_temporal(ws, test_fraction=0.1)
    fs = build_feature_state(ws)
    e = load_engagements(ws, fs, split)
    hist = Histories.build(e, len(fs.users))
    ex = positive_examples(e, FeaturesConfig(), parts=(0, 1))
    future = fs.pins.encode(["FUTURE"])[0]
    t_future = int(e.t[e.pin == future][0])
    pins, actions = hist.at(ex.user, ex.t, L=50)
    for i in range(len(ex.user)):
        seen = pins[i][pins[i] > 0]
        # every history event is strictly older than the example
        assert np.all(np.isin(seen, e.pin[(e.user == ex.user[i]) & (e.t < ex.t[i])]))
        if ex.t[i] <= t_future:
            assert future not in seen, f"example at {ex.t[i]} sees the future engagement"
    assert any(future in row for row in pins), "later examples do see it (the check is not vacuous)"
    # hides are kept (marked), impressions never enter a history
    assert ACTION_CODE["hide"] in actions and ACTION_CODE["impression"] not in actions
    # at the cut, the history holds only pre-cut events and is capped at L, most recent last
    cut_us = int(split.cut.timestamp() * 1e6)
    p, _ = hist.at(np.array([ex.user[0]]), np.array([cut_us]), L=5)
    assert np.all(e.t[np.isin(e.pin, p[0])] < cut_us) and (p[0] > 0).sum() == 5
    assert list(fs.pins.decode(p[0][-1:])) == [fs.pins.decode(e.pin[(e.t < cut_us) & (e.action != 1)][-1:])[0]]
