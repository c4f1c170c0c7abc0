"""features.user_gap: the time since the user's last engagement as one more user categorical column,
point in time in training (as of each example's time) and as of the bundle's time in serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.errors import EbrError
from ebr.features.age import HOUR_US, N_AGE_BUCKETS
from ebr.features.batches import user_batch
from ebr.features.examples import T_MAX, Engagements, Histories
from ebr.features.state import ACTION_CODE, FIRST_ID, UserArrays
from ebr.index.bundle import build_bundle
from ebr.serve.retriever import Retriever
from ebr.train.loop import prepare, train
from tests.conftest import crash_at

CFG = {"train.epochs": 1, "train.batch_size": 256, "train.threads": 1, "train.val_users": 50,
       "model.hidden": [16], **NO_CHOICE}


def _bucket(hours: float) -> int:
    """The pin-age formula (features/age.py) for a gap in hours."""
    return 2 + int(np.floor(2 * np.log2(1 + hours)))


def test_gap_buckets_count_from_the_last_event_strictly_before_t():
    """User 2 engaged at hours 0 and 10 (an impression at hour 20 is no event of its history);
    user 3 never. Hand-computed buckets: at hour 10 the last event is hour 0's (strictly before),
    just after hour 10 it is hour 10's; a row read at the end of the data counts to gap_as_of, and
    one ending a history one event earlier (`back`) counts from that event; an empty history is 0.
    Catches <= for < (the row's own event dates it), T_MAX left as the reference time, `back`
    ignored, the impression counted, and an empty history given a gap."""
    t = np.array([0, 10, 20]) * HOUR_US
    e = Engagements(user=np.array([2, 2, 2]), pin=np.array([5, 6, 7]), t=t,
                    action=np.array([ACTION_CODE["click"], ACTION_CODE["save"], ACTION_CODE["impression"]]),
                    weight=np.ones(3, dtype=np.float32), part=np.zeros(3, dtype=np.int8))
    hist = Histories.build(e, n_users=4)
    none = np.zeros((4, 1), dtype=np.int64)
    ua = UserArrays(cat=none, followed=[[]] * 4, followed_pad=none)
    users = np.array([2, 2, 2, 2, 3])
    times = np.array([10 * HOUR_US, 10 * HOUR_US + 1, 30 * HOUR_US, T_MAX, T_MAX])
    ub = user_batch(users, times, hist, ua, L=4, gap_as_of=40 * HOUR_US)
    assert ub.cat.shape == (5, 2)
    assert ub.cat[:, 1].tolist() == [_bucket(10), 2, _bucket(20), _bucket(30), 0]
    back = user_batch(users[:4], times[:4], hist, ua, L=4, back=np.ones(4, dtype=np.int64), gap_as_of=40 * HOUR_US)
    assert back.cat[:, 1].tolist() == [0, _bucket(10), _bucket(30), _bucket(40)]
    assert user_batch(users, times, hist, ua, L=4).cat.shape == (5, 1), "no column unless asked"


def test_auto_reads_gaps_under_temporal_splits_of_timed_data(tiny_ws, llo_ws, tmp_path):
    """auto: on under the temporal split (the tiny world), off under leave_last_out and on data
    without time; `off` turns it off; `on` without time is an error. Catches the rule inverted,
    `auto` read as on (or off) everywhere, the split's kind ignored, and the sizes the model is
    built from left without the bucket count."""
    from tests.data.test_given_split import _adjacency

    def gap(ws, **over):
        return prepare(ws, RunConfig.load(None, {**CFG, **over})).sizes["user_gap"]

    assert gap(tiny_ws) == N_AGE_BUCKETS
    assert gap(tiny_ws, **{"features.user_gap": "off"}) == 0
    assert gap(llo_ws, **{"data.split": "leave_last_out"}) == 0
    assert gap(llo_ws, **{"data.split": "leave_last_out", "features.user_gap": "on"}) == N_AGE_BUCKETS
    untimed = _adjacency(tmp_path / "ids", order="engagement")
    assert gap(untimed) == 0
    with pytest.raises(EbrError, match="needs engagement timestamps"):
        gap(untimed, **{"features.user_gap": "on"})


def test_training_and_the_bundle_read_the_same_gap(tiny_ws, monkeypatch):
    """For the same time (the bundle's as-of), the refit's user inputs and the bundle's stored
    user state carry the same gap buckets, several distinct ones. A known user's request reads its
    stored bucket, with or without a history of its own (the stored history passed back gives the
    stored answer: tests/eval/test_end_to_end.py); an unknown user's passed history reads a zero
    gap (bucket 2: the history ends now); an unknown user without history reads 0 (no earlier
    engagement, as a training row without history). The run records the choice. Catches the
    bundle counting to another time (or not at all: the tower's column count differs), the bundle
    reading other parts than the refit, an unknown user served the out-of-vocabulary code 1 (a
    bucket no training row has), and an unknown user's history read as no history."""
    cfg = RunConfig.load(None, {**CFG, "train.max_steps": 4})
    summary = train(tiny_ws, cfg, run="gap", progress=False)
    assert summary["user_gap"] is True
    r = Retriever(build_bundle(tiny_ws, "gap"))
    assert r.manifest["user_tower"]["user_gap"] is True
    rd = prepare(tiny_ws, cfg, refit=True)
    U = len(rd.fs.users)
    want = user_batch(np.arange(U), np.full(U, rd.as_of), rd.hist, rd.users, 4, gap_as_of=rd.as_of).cat[:, -1]
    got = torch.from_numpy(r.cat[:, -1])
    assert r.manifest["as_of_us"] == rd.as_of
    # a user whose last event is at as_of itself reads it at T_MAX (inclusive) but not at as_of (strictly before)
    same = (rd.hist.last_time(np.arange(U), np.full(U, T_MAX)) != rd.as_of)
    assert torch.equal(got[FIRST_ID:][same[FIRST_ID:]], want[FIRST_ID:][same[FIRST_ID:]])
    assert len(torch.unique(got[FIRST_ID:])) > 3, "the tiny world's users differ in their gaps"
    seen = []
    orig = r.embed
    monkeypatch.setattr(r, "embed", lambda *inputs, **kw: (seen.append(inputs[2].copy()), orig(*inputs, **kw))[1])
    known, pin, interest = r.fs.users.ids[0], r.pin_ids[FIRST_ID], r.fs.interests.ids[0]
    r.retrieve(known, k=5)
    r.retrieve(known, k=5, history=[pin])
    r.retrieve("nobody-knows-me", k=5, history=[pin])
    r.retrieve("nobody-knows-me", k=5, followed=[interest])
    assert r.cat[FIRST_ID, -1] != 2, "the known user's stored gap is not the just-now bucket"
    assert [int(x[0, -1]) for x in seen] == [r.cat[FIRST_ID, -1]] * 2 + [2, 0]


def test_resuming_a_checkpoint_from_before_gaps_is_a_clear_error(tiny_ws, monkeypatch):
    """A checkpoint saved before features.user_gap (no count in its sizes) resumes under `auto`,
    which now reads gaps on this data: an EbrError naming the setting, not load_state_dict's
    size-mismatch traceback. Catches the check removed."""
    cfg = RunConfig.load(None, {**CFG, "train.checkpoint_every": 2})
    path = crash_at(tiny_ws, cfg, "old-gap", 3, monkeypatch)
    state = torch.load(path, weights_only=True)
    del state["sizes"]["user_gap"]
    del state["config"]["features"]["user_gap"]
    torch.save(state, path)
    with pytest.raises(EbrError, match="features.user_gap"):
        train(tiny_ws, cfg, run="old-gap", resume=True, progress=False)
