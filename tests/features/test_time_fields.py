"""The time term's fields (pin age, recent engagement counts): read as of a time, hand-checked, and
the same values in training and in the bundle for the same time."""

from __future__ import annotations

import numpy as np
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.features.age import HOUR_US, NO_TIME, NOT_YET, UNKNOWN, age_buckets, created_times
from ebr.features.examples import Engagements
from ebr.features.pinstats import DAY_US, DailyCounts
from ebr.features.state import ACTION_CODE
from ebr.index.bundle import build_bundle, load_checkpoint, served_checkpoint
from ebr.serve.retriever import Retriever
from ebr.train.loop import prepare, train


def test_age_buckets_by_hand():
    """Buckets 2 + floor(2 log2(1 + hours)); a pin created after t is NOT_YET, one without a creation
    time UNKNOWN. Mutations caught: age computed as created - t (sign), NOT_YET or UNKNOWN dropped,
    octaves instead of half octaves."""
    created = np.array([0, 0, 0, 0, 10 * HOUR_US, NO_TIME])
    t = np.array([0, 1, 3, 15, 0, 5]) * HOUR_US
    assert age_buckets(created, t).tolist() == [2, 4, 6, 10, NOT_YET, UNKNOWN]
    # broadcasting: every pin as of every time (training reads a batch this way)
    assert age_buckets(created[None, :2], t[:2, None]).tolist() == [[2, 2], [4, 4]]


def test_fast_bucket_paths_equal_the_definitions():
    """Training reads every pin of a batch as of every row's time, (1, N) against (B, 1), through
    fast paths: ages by integer bucket edges and a cumulative count down the time-sorted rows, counts
    once per distinct day. Both must equal the definitions pair by pair (the float formula for ages,
    DailyCounts.at element-wise for counts), including ages exactly at, one microsecond before and
    after each edge. Mutations caught: side="left" in the edge search (an age exactly at an edge one
    bucket low), edges found for the wrong bucket, rows not put back in their order after the sort,
    the per-day counts repeated in sorted-day order instead of each row's day."""
    from ebr.features.age import AGE_EDGES_US, N_AGE_BUCKETS, _age_bucket_formula
    from ebr.features.pinstats import N_COUNT_BUCKETS

    rng = np.random.default_rng(0)
    edges = np.concatenate([AGE_EDGES_US - 1, AGE_EDGES_US, AGE_EDGES_US + 1])
    ages = np.concatenate([edges[edges >= 0], rng.integers(0, 2 * 10**13, 5000)])
    assert age_buckets(np.zeros_like(ages), ages).tolist() == _age_bucket_formula(ages).tolist()
    assert age_buckets(np.array([5]), np.array([4])).tolist() == [NOT_YET]
    t0 = 10**15
    created = t0 - rng.integers(-10 * HOUR_US, 4000 * HOUR_US, 40)
    created[::5] = NO_TIME
    t = t0 + rng.integers(-5 * HOUR_US, 50 * HOUR_US, 30)
    t[3] = created[1] + AGE_EDGES_US[6]  # exactly on an edge
    fast = age_buckets(created[None, :], t[:, None])
    slow = np.array([[age_buckets(created[j:j + 1], t[i:i + 1])[0] for j in range(40)] for i in range(30)])
    assert fast.shape == (30, 40) and np.array_equal(fast, slow)
    assert fast.min() == UNKNOWN and fast.max() < N_AGE_BUCKETS

    days = rng.uniform(0, 30, 400)
    e = _events([(d, int(p)) for d, p in zip(days, rng.integers(2, 12, 400))])
    c = DailyCounts.build(e, np.arange(12) // 2, np.ones(400, dtype=bool), [1, 7, 30])
    pins, tt = rng.integers(0, 12, 25), (rng.uniform(0, 35, 60) * DAY_US).astype(np.int64)
    fast = c.buckets(pins[None, :], tt[:, None])
    slow = c.at(np.broadcast_to(pins, (60, 25)).ravel(), np.repeat(tt, 25)).reshape(60, 25, 3)
    assert np.array_equal(fast, np.minimum(np.floor(2 * np.log2(1 + slow)), N_COUNT_BUCKETS - 1))
    assert len(np.unique(tt // DAY_US)) < 60 and fast.max() > 2  # days repeat; counts are not all zero


def test_creation_time_falls_back_to_the_first_visible_engagement():
    """The table's creation time wins; without one, the first *visible* engagement. Mutation caught:
    taking the first engagement over every part (a test-window first engagement would leak)."""
    table = np.array([NO_TIME, NO_TIME, 50, NO_TIME, NO_TIME])
    pin = np.array([2, 3, 3, 4, 4])
    t = np.array([7, 9, 8, 100, 3])
    visible = np.array([True, True, True, True, False])
    assert created_times(table, pin, t, visible).tolist() == [NO_TIME, NO_TIME, 50, 8, 100]


def _events(days_pins: list[tuple[float, int]]) -> Engagements:
    day = np.array([d for d, _ in days_pins])
    n = len(day)
    return Engagements(user=np.zeros(n, dtype=np.int64), pin=np.array([p for _, p in days_pins]),
                       t=(day * DAY_US).astype(np.int64), action=np.full(n, ACTION_CODE["click"]),
                       weight=np.ones(n, dtype=np.float32), part=np.zeros(n, dtype=np.int8))


def test_daily_counts_read_whole_days_before_t():
    """Counts over the w whole days before t's day, per group. Mutations caught: counting t's own day
    (an event earlier the same day, or at t itself, would reach the example), an off-by-one window,
    counting per pin instead of per group, counting invisible events."""
    e = _events([(10.2, 2), (10.9, 3), (12.5, 2), (13.1, 2), (13.5, 4), (13.6, 2)])
    group = np.array([0, 1, 2, 2, 4])  # pins 2 and 3 share a (coarse signature) group
    visible = np.array([True, True, True, True, True, False])
    c = DailyCounts.build(e, group, visible, [1, 3])
    at = lambda pin, day: c.at(np.array([pin]), np.array([int(day * DAY_US)]))[0].tolist()  # noqa: E731
    assert at(2, 13.9) == [1, 3]  # days 10..12: two events of pin 2 and one of pin 3 (same group)
    assert at(3, 13.9) == [1, 3]
    assert at(2, 13.0) == [1, 3]  # the start of day 13: the same
    assert at(2, 12.99) == [0, 2]  # day 12's own event is not counted on day 12
    assert at(2, 14.0) == [1, 2]  # day 13: one visible event of the group; day 10 left the 3-day window
    assert at(4, 14.0) == [1, 1]
    assert at(2, 9.0) == [0, 0] and at(2, 400.0) == [0, 0]


def test_training_and_the_bundle_read_the_same_time_term(tiny_ws):
    """For the same time (the bundle's as-of), the refit's features and the bundle's stored vectors
    agree: the bundle stores [v, sum of the time embeddings of the buckets training reads].
    Mutations caught: the bundle reading the time term as of another time, from another
    granularity or from other visible parts than the refit's."""
    cfg = RunConfig.load(None, {"train.max_steps": 4, "train.epochs": 1, "model.hidden": [16], **NO_CHOICE})
    train(tiny_ws, cfg, run="tt", progress=False)
    bundle = build_bundle(tiny_ws, "tt")
    r = Retriever(bundle)
    rd = prepare(tiny_ws, cfg, refit=True)
    as_of = r.manifest["time_term"]["as_of_us"]
    assert as_of == rd.as_of and rd.time is not None and rd.time.counts is not None and rd.time.has_age
    P = len(r.pin_ids)
    b = rd.time_buckets(np.arange(P), np.array([as_of]))[0]  # (P, F) as training reads them at as_of
    assert len(np.unique(b[:, 0].numpy())) > 3 and b[:, 1:].max() > 0, "ages and counts vary"
    model, _ = load_checkpoint(served_checkpoint(tiny_ws, "tt"))
    with torch.no_grad():
        want = sum(e(b[:, f]) for f, e in enumerate(model.time))
    got = r.pin_emb[:, model.dim:]
    assert torch.allclose(got, want, atol=1e-6)
    assert got.abs().sum() > 0, "the time embeddings were trained"


def test_a_first_engagement_does_not_date_its_own_example():
    """Without pins.created_at a pin exists from its first engagement: at that engagement's own
    time (the positive) and before it (a negative) its age is UNKNOWN, the same for both, and it
    is not removed from the negatives; a pin with a table creation time is NOT_YET before it.
    Mutation caught: the positive's own first engagement giving it age 0 (bucket 2), a value that
    negatives hardly ever have, so the feature would mark the positive."""
    from ebr.features.age import TimeFields

    created = np.array([NO_TIME, NO_TIME, 5 * HOUR_US, 5 * HOUR_US])  # pins 2, 3: first engaged at 5 h
    tf = TimeFields(created, None, from_table=np.array([False, False, True, False]))
    t = np.array([5, 4, 6]) * HOUR_US
    got = tf.buckets(np.array([[2, 3]]), t[:, None])[..., 0]
    assert got.tolist() == [[2, UNKNOWN], [NOT_YET, UNKNOWN], [4, 4]]


def test_training_reads_every_batch_pin_as_of_each_examples_time(tiny_ws, monkeypatch):
    """In a training step the time-term buckets are read for every pin of the batch as of each
    row's own example time, and a pin created after a row's time is no negative of that row (-inf).
    Mutations caught: buckets read at one time for the whole batch (e.g. the end of the data), or
    at each pin's own engagement time; the NOT_YET mask dropped."""
    from ebr.train import loop
    from ebr.train.loop import TrainData

    seen: dict[str, list] = {"buckets": [], "extra": []}
    real_tb, real_loss = TrainData.time_buckets, loop.sampled_softmax_logq

    def tb(self, pins, t):
        out = real_tb(self, pins, t)
        seen["buckets"].append((np.asarray(pins).copy(), np.asarray(t).copy(), out.clone(), self))
        return out

    def loss(*args, **kw):
        seen["extra"].append(args[9] if len(args) > 9 else kw.get("extra"))
        return real_loss(*args, **kw)

    monkeypatch.setattr(TrainData, "time_buckets", tb)
    monkeypatch.setattr(loop, "sampled_softmax_logq", loss)
    cfg = RunConfig.load(None, {"train.max_steps": 2, "train.epochs": 1, "model.hidden": [16], "train.refit": False,
                                "train.batch_size": 256, **NO_CHOICE})
    train(tiny_ws, cfg, run="tt-rows", progress=False)
    pins, t, buckets, d = seen["buckets"][0]
    ex = set(zip(d.examples.pin.tolist(), d.examples.t.tolist()))
    assert all((p, x) in ex for p, x in zip(pins.tolist(), t.tolist())), "row b is read at example b's time"
    assert len(np.unique(t)) > 10
    want = torch.from_numpy(d.time.buckets(pins[None, :], t[:, None]))
    off = ~torch.eye(len(pins), dtype=torch.bool)
    assert torch.equal(buckets[off], want[off])
    not_yet = (want[..., 0] == NOT_YET) & off
    assert not_yet.any(), "some pins of the batch are not created yet at some rows' times"
    assert torch.isinf(seen["extra"][0][not_yet]).all() and torch.isfinite(seen["extra"][0][~not_yet]).all()


def test_time_prior_starts_the_score_at_the_mean_log_recent_count(tiny_ws):
    """model.time_prior: a new model's time term, for any user, scores each pin at the mean over
    the count windows of ln(1 + its recent count) as of the row's time (within half a bucket,
    ln 2 / 4), with the age field adding nothing; off, the time term starts at zero. Checked against
    the raw counts, not the buckets. Mutations caught: the prior left unscaled by tau, the query's
    channel 0 left to its random weights or its bias at 0, the windows summed instead of averaged,
    bucket middles one bucket off (b instead of b + 0.5, or octaves), the flag not reaching
    TrainState.fresh, the prior applied with the flag off."""
    from ebr.features.pinstats import bucket_log_counts
    from ebr.train.loop import TrainState

    cfg = RunConfig.load(None, {"model.time_prior": True, **NO_CHOICE})
    d = prepare(tiny_ws, cfg)
    assert d.time is not None and d.time.has_age and len(d.time.counts.windows) == 3
    torch.manual_seed(0)
    model = TrainState.fresh(cfg, d.sizes, d.id_tables, d.positives(), d.time).model
    n_pins = d.sizes["n_pins"]
    pins, t = np.arange(2, n_pins), np.sort(d.examples.t)[-5:]
    buckets = d.time_buckets(pins, t)  # (5, N, F)
    counts = d.time.counts.at(pins[None, :], t[:, None])  # (5, N, 3)
    want = np.log1p(counts).mean(-1)
    assert want.max() > 1.0 and (counts == 0).any(), "the fixture's pins differ in recent counts"
    u = torch.nn.functional.normalize(torch.randn(5, cfg.model.dim), dim=-1)
    q = torch.cat([u, model.user.time_weights(u)], dim=-1)
    with torch.no_grad():
        got = (model.time_logits(q, buckets) / cfg.model.temperature).numpy()
    assert np.abs(got - want).max() <= np.log(2) / 4 + 1e-5
    assert np.all(got[counts.sum(-1) == 0] == 0)
    # the bucket middles themselves: ln(1 + c) for every count falls within half a bucket of its own
    c = np.arange(0, 5000)
    b = np.minimum(np.floor(2 * np.log2(1 + c)), 31).astype(int)
    assert np.abs(bucket_log_counts()[b] - np.log1p(c)).max() <= np.log(2) / 4 + 1e-6
    off = RunConfig.load(None, {**NO_CHOICE})
    plain = TrainState.fresh(off, d.sizes, d.id_tables, d.positives(), d.time).model
    with torch.no_grad():
        assert torch.equal(plain.time_logits(q, buckets), torch.zeros(5, len(pins)))
