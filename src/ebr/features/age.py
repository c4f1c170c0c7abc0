"""The model's time term: a pin's age as of a time, in log-spaced buckets (half an octave of hours
each), with its recent engagement counts (features/pinstats.py DailyCounts) in `TimeFields`.

A pin's creation time is `pins.created_at` where the source has one (the synthetic world's birth
time, MovieLens' release date); otherwise its first engagement among the *visible* engagements of
the stage (training: the training part; a bundle: what it may read), so a first engagement in the
validation or test window never reaches the features. Sources without timestamps have no age.

Age is read as of the time of each example in training (for the positive and for every in-batch
negative alike: an example at t scores every candidate pin by its age at t) and as of the bundle's
time at index build. Buckets: UNKNOWN (no creation time), NOT_YET (created after t: the pin does not
exist yet, so it is no candidate and no negative), then 2 + floor(2 log2(1 + age in hours)), capped:
bucket edges at 0.4, 1, 1.8, 3, 4.7, 7, 10, 15, 22, 31 ... hours, the last bucket from about a year.
A bundle's ages go stale as time passes: a pin 10 hours old changes bucket within about 4 hours, one
a week old within about 2.5 days, so a bundle serving fresh pins is rebuilt at least daily.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebr.data.tables import connect
from ebr.features.pinstats import N_COUNT_BUCKETS, DailyCounts, bucket_log_counts
from ebr.features.state import FIRST_ID, FeatureState
from ebr.workspace import Workspace

N_AGE_BUCKETS = 30
UNKNOWN, NOT_YET = 0, 1
NO_TIME = np.iinfo(np.int64).min  # created time of a pin whose age is unknown
HOUR_US = 3600 * 10**6


def table_created(ws: Workspace, fs: FeatureState) -> np.ndarray:
    """(P,) int64 microseconds of pins.created_at per pin code (NO_TIME where null or absent)."""
    out = np.full(len(fs.pins), NO_TIME, dtype=np.int64)
    con = connect(ws)
    if "created_at" not in [r[0] for r in con.execute("DESCRIBE pins").fetchall()]:
        return out  # tables imported before the column existed
    t = con.sql("SELECT pin_id, epoch_us(created_at) AS c FROM pins WHERE created_at IS NOT NULL").to_arrow_table()
    out[fs.pins.encode(t["pin_id"])] = t["c"].to_numpy(zero_copy_only=False).astype(np.int64)
    return out


def created_times(table: np.ndarray, pin: np.ndarray, t: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(P,) creation time per pin code: the table's, else the first visible engagement's (any action);
    `pin`, `t`, `visible` are the engagements' pin codes, times and visibility."""
    first = np.full(len(table), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, pin[visible], t[visible])
    out = np.where(table != NO_TIME, table, np.where(first < np.iinfo(np.int64).max, first, NO_TIME))
    out[:FIRST_ID] = NO_TIME  # padding / out-of-vocabulary rows
    return out


def _age_bucket_formula(age_us: np.ndarray) -> np.ndarray:
    """The definition: 2 + min(floor(2 log2(1 + age in hours)), N_AGE_BUCKETS - 3) for ages >= 0."""
    age_h = np.asarray(age_us, dtype=np.int64) / HOUR_US
    return 2 + np.minimum(np.floor(2 * np.log2(1 + age_h)), N_AGE_BUCKETS - 3).astype(np.int64)


def _age_edges() -> np.ndarray:
    """(N_AGE_BUCKETS - 2,) int64: the smallest age in microseconds of each bucket from 2 on, found
    by bisection on the formula itself, so that searching them gives the formula's buckets exactly."""
    edges = [0]
    for k in range(3, N_AGE_BUCKETS):
        lo, hi = edges[-1], 1 << 62  # the formula is non-decreasing in the age
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _age_bucket_formula(np.array([mid]))[0] < k else (lo, mid)
        edges.append(lo)
    return np.array(edges, dtype=np.int64)


AGE_EDGES_US = _age_edges()


def age_buckets(created: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Bucket of each pin's age at each time; `created` and `t` broadcast (e.g. (1, N) against (B, 1)
    for every pin of a batch as of every example's time). One integer search per pair: an age below
    0 lands before the first edge (NOT_YET = 1), an age in bucket k's range gives k."""
    created, t = np.asarray(created, dtype=np.int64), np.asarray(t, dtype=np.int64)
    known = created != NO_TIME
    if created.ndim == 2 and t.ndim == 2 and created.shape[0] == 1 and t.shape[1] == 1 and t.shape[0] > 1:
        b = _outer_age_buckets(np.where(known, created, 0)[0], t[:, 0])
    else:
        b = 1 + np.searchsorted(AGE_EDGES_US, t - np.where(known, created, 0), side="right")
    np.putmask(b, np.broadcast_to(~known, b.shape), UNKNOWN)
    return b


def _outer_age_buckets(created: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(B, N) buckets of N pins as of B times without a search per pair: pin j reaches bucket edge
    k at time created_j + edge_k; with the times sorted, each (pin, edge) is found once among them,
    and a row's bucket is 1 + the edges reached by its time (a cumulative count down the rows)."""
    B, N = len(t), len(created)
    order = np.argsort(t, kind="stable")
    first_row = np.searchsorted(t[order], created[:, None] + AGE_EDGES_US[None, :], side="left")  # (N, E)
    reached = np.bincount((first_row * N + np.arange(N)[:, None]).ravel(), minlength=(B + 1) * N)
    reached = reached[: B * N].reshape(B, N)
    for r in range(1, B):  # row by row: numpy's cumsum down axis 0 is ten times slower here
        reached[r] += reached[r - 1]
    rank = np.empty(B, dtype=np.int64)
    rank[order] = np.arange(B)
    return 1 + reached[rank]


@dataclass
class TimeFields:
    """The fields of the model's time term, each a bucket read as of a time: the pin's age (when
    `created` is given) and its engagement counts per window (when `counts` is)."""

    created: np.ndarray | None  # (P,) creation times (created_times)
    counts: DailyCounts | None
    from_table: np.ndarray | None = None  # (P,) bool: created is pins.created_at (else a first engagement)

    @property
    def sizes(self) -> list[int]:
        """Bucket count per field, in the order of `buckets`' last axis."""
        return ([N_AGE_BUCKETS] if self.created is not None else []) + (
            [N_COUNT_BUCKETS] * len(self.counts.windows) if self.counts is not None else [])

    @property
    def has_age(self) -> bool:
        return self.created is not None

    def popularity_prior(self) -> list[np.ndarray | None]:
        """Per field, a value per bucket for model.time_prior: each count window's ln(1 + count)
        at its buckets' middles divided by the window count (their sum: the mean log count over the
        windows); None for the age field."""
        n = len(self.counts.windows) if self.counts is not None else 0
        return ([None] if self.created is not None else []) + [bucket_log_counts() / n] * n

    def buckets(self, pins: np.ndarray, t: np.ndarray) -> np.ndarray:
        """pins and times broadcast together (shape S) -> (S..., fields) int64; with the age field,
        field 0 is NOT_YET where a pin with a creation time (pins.created_at) is created after t.

        A pin whose creation time is its first engagement is UNKNOWN until an engagement strictly
        before t exists, for positives and negatives alike: otherwise the positive's own (first)
        engagement would give it age 0, a value in-batch negatives hardly ever have, and the age
        would mark the positive instead of describing the pin."""
        pins, t = np.asarray(pins), np.asarray(t, dtype=np.int64)  # not broadcast: gathers stay (1, N)
        # field-major underneath (each field's slab contiguous: written and gathered without strides)
        out = np.empty((len(self.sizes),) + np.broadcast_shapes(pins.shape, t.shape), dtype=np.int64)
        if self.created is not None:
            created = self.created[pins]
            out[0] = age_buckets(created, t)
            if self.from_table is not None:
                np.putmask(out[0], ~self.from_table[pins] & (created >= t), UNKNOWN)
        if self.counts is not None:
            out[int(self.created is not None):] = np.moveaxis(self.counts.buckets(pins, t), -1, 0)
        return np.moveaxis(out, 0, -1)
