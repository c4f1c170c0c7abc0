"""Everything an example sees is computed from data strictly before its timestamp."""

from __future__ import annotations

import numpy as np
import torch

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


def test_training_horizon_ends_each_history_up_to_h_minus_1_events_before_the_target(tiny_ws):
    """train.horizon H: a row's history is the user's last L events before its k-th previous event,
    k drawn in 0..H-1 (0: the plain history), never before the user's first event, never later than
    the target. Catches the offset applied in the wrong direction (a history reaching past the
    target: leakage), an offset ignored (H = 1 behaviour at every H), and k drawn up to H instead
    of H - 1; a history never holds another user's events (offsets past a user's first event). The
    batch's distinct codes (for the model) are those of its histories and pins: catches the pins left out."""
    from ebr.config import RunConfig
    from ebr.train.distributed import Ranks
    from ebr.train.loop import assemble, prepare

    cfg = RunConfig.load(None, {"train.horizon": 4, "train.batch_size": 256})
    d = prepare(tiny_ws, cfg)
    ex, h, L = d.examples, d.hist, cfg.features.history_len
    # Histories level: each back value is the plain history of an earlier cut, exactly
    users, t = ex.user[:400], ex.t[:400]
    base = h.at(users, t, L + 8)[0]
    for k in range(4):
        got = h.at(users, t, L, back=np.full(len(users), k))[0]
        j = np.searchsorted(h.key, users * h.R + np.searchsorted(h.times, t, side="left"))
        n_before = j - h.start[users]  # events of the user before the target
        for i in range(len(users)):
            keep = max(0, min(L, n_before[i] - k))
            want = base[i, L + 8 - k - keep: L + 8 - k] if keep else np.zeros(0, dtype=np.int64)
            assert np.array_equal(got[i, L - keep:], want) and not got[i, : L - keep].any(), (k, i)
    # assembly level: each row's history is one of the H plain cuts, every offset 0..H-1 drawn
    seen = set()
    order = np.random.default_rng(0).permutation(len(ex.user))[:256]
    for step in range(1, 6):
        b = assemble(d, cfg, order, step, Ranks())
        hist = b.ub.hist.numpy()
        uniq, inv = b.distinct  # the model's distinct codes, computed in the assembly
        assert torch.equal(uniq[inv], torch.cat([b.ub.hist.reshape(-1), b.local_pins])) and (uniq.diff() > 0).all()
        for i, e in enumerate(order[:64]):
            cuts = [h.at(ex.user[e: e + 1], ex.t[e: e + 1], L, back=np.array([k]))[0][0] for k in range(5)]
            match = [k for k in range(5) if np.array_equal(hist[i], cuts[k])]
            assert match and min(match) < 4, (step, i)
            if len(match) == 1:
                seen.add(match[0])
    assert seen == {0, 1, 2, 3}
