"""Per-pin engagement statistics as of any time: counts per positive action over trailing
windows (default 7/30/90 days), at a chosen granularity.

Granularity matters (TECHNIQUES.md 5): the serving corpus dedupes pins by *coarse* image
signature, so statistics served with a pin are those of its coarse group. Computing training
features per fine signature (or per pin) and serving features per coarse group makes the same
feature mean different things offline and online. `group_codes(..., "coarse")` remaps every pin
to its coarse signature so training and serving aggregate identically.

Point in time: a statistic as of t counts only events with ts < t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebr.data.tables import connect
from ebr.features.examples import T_MAX, Engagements
from ebr.features.state import ACTION_CODE, FeatureState
from ebr.workspace import Workspace

DAY_US = 86400 * 10**6
STAT_ACTIONS = ("closeup", "click", "save")


def group_codes(ws: Workspace, fs: FeatureState, granularity: str = "coarse") -> np.ndarray:
    """(P,) group id of each pin code: its coarse image signature ('coarse'), its fine image
    signature ('fine'), or itself ('pin'). Padding/OOV rows get their own groups."""
    P = len(fs.pins)
    if granularity == "pin":
        return np.arange(P)
    col = {"coarse": "image_sig_coarse", "fine": "image_sig"}.get(granularity)
    if col is None:
        raise ValueError(f"unknown statistics granularity {granularity!r}: use coarse, fine or pin")
    t = connect(ws).sql(f"SELECT pin_id, {col} AS sig FROM pins").to_arrow_table()
    codes = fs.pins.encode(t["pin_id"])
    _, sig_group = np.unique(np.asarray(t["sig"].to_pylist(), dtype=object).astype(str), return_inverse=True)
    out = np.arange(P) + 0  # pins missing from the table keep a group of their own
    out[codes] = P + sig_group
    return out


@dataclass
class PinStats:
    group: np.ndarray  # (P,) group of each pin code
    keys: list[np.ndarray]  # per action: sorted group * R + rank(t)
    times: np.ndarray
    R: int
    windows_us: list[int]
    last_t: int

    @property
    def width(self) -> int:
        return len(self.keys) * len(self.windows_us)

    @classmethod
    def build(cls, e: Engagements, group: np.ndarray, visible: np.ndarray, windows_days: list[int]) -> PinStats:
        m = visible & np.isin(e.action, [ACTION_CODE[a] for a in STAT_ACTIONS])
        t = e.t[m]
        times = np.unique(t)
        R = len(times) + 2
        pseudo = len(t) == 0 or t.max() < 10**13  # file order, not time: no windows
        windows = [T_MAX // 4] * len(windows_days) if pseudo else [d * DAY_US for d in windows_days]
        g = group[e.pin[m]].astype(np.int64)
        rank = np.searchsorted(times, t)
        keys = [
            np.sort(g[e.action[m] == ACTION_CODE[a]] * R + rank[e.action[m] == ACTION_CODE[a]]) for a in STAT_ACTIONS
        ]
        return cls(group.astype(np.int64), keys, times, R, windows, int(t.max()) + 1 if len(t) else 0)

    def at(self, pins: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(N,) pin codes, (N,) times (T_MAX = after every visible event) -> (N, actions * windows)
        log1p counts of events strictly before t."""
        t = np.where(np.asarray(t) == T_MAX, self.last_t, t).astype(np.int64)
        base = self.group[pins] * self.R
        hi_rank = np.searchsorted(self.times, t, side="left")
        out = np.empty((len(pins), self.width), dtype=np.float32)
        j = 0
        for key in self.keys:
            hi = np.searchsorted(key, base + hi_rank, side="left")
            for w in self.windows_us:
                lo_rank = np.searchsorted(self.times, np.maximum(t - w, np.iinfo(np.int64).min // 2), side="left")
                lo = np.searchsorted(key, base + lo_rank, side="left")
                out[:, j] = np.log1p(hi - lo)
                j += 1
        return out


N_COUNT_BUCKETS = 32


def bucket_log_counts() -> np.ndarray:
    """(N_COUNT_BUCKETS,) ln(1 + count) at the middle of each count bucket (bucket b holds
    2 log2(1 + c) in [b, b + 1)); bucket 0 holds only c = 0: ln 1 = 0."""
    b = np.arange(N_COUNT_BUCKETS, dtype=np.float64)
    return np.where(b == 0, 0.0, (b + 0.5) / 2 * np.log(2)).astype(np.float32)


@dataclass
class DailyCounts:
    """Positive engagements per pin group and UTC day, cumulative, for the time term of the model
    (features/age.py has the other field): counts over trailing windows of whole days *before* the
    day of t, so training (as of each example's time, for every pin of the batch) and a bundle (as of
    its time) read the same value for the same t, and nothing of t's own day is used.

    Memory: (groups x days) int32; the small synthetic world needs about 35 MB."""

    group: np.ndarray  # (P,) group of each pin code (rows of cum)
    cum: np.ndarray  # (G, D + 1) events before day d (relative to day0)
    day0: int
    windows: list[int]

    @classmethod
    def build(cls, e: Engagements, group: np.ndarray, visible: np.ndarray, windows_days: list[int]) -> DailyCounts:
        m = visible & np.isin(e.action, [ACTION_CODE[a] for a in STAT_ACTIONS])
        _, g = np.unique(group, return_inverse=True)
        day = e.t[m] // DAY_US
        day0 = int(day.min()) if len(day) else 0
        D = int(day.max()) - day0 + 1 if len(day) else 1
        daily = np.zeros((int(g.max()) + 1, D + 1), dtype=np.int32)
        np.add.at(daily, (g[e.pin[m]], day - day0 + 1), 1)
        return cls(g.astype(np.int64), np.cumsum(daily, axis=1, dtype=np.int32), day0, list(windows_days))

    def at(self, pins: np.ndarray, t: np.ndarray) -> np.ndarray:
        """pins and times (broadcast together, any shape S) -> (S..., windows) counts of the pin's group
        in the `w` whole days before t's day."""
        D = self.cum.shape[1] - 1
        d = np.asarray(t, dtype=np.int64) // DAY_US - self.day0
        g = self.group[np.asarray(pins)]  # gathered before broadcasting: (1, N) against (B, 1) stays small
        hi = self.cum[g, np.clip(d, 0, D)]
        return np.stack([hi - self.cum[g, np.clip(d - w, 0, D)] for w in self.windows], axis=-1)

    def buckets(self, pins: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Log-spaced buckets of `at`: min(floor(2 log2(1 + count)), N_COUNT_BUCKETS - 1).

        Every pin of a batch as of every row's time (pins (1, N), t (B, 1)) is read once per
        distinct day of the rows (counts depend on t's day only), then repeated per row."""
        pins, t = np.asarray(pins), np.asarray(t, dtype=np.int64)
        if pins.ndim == 2 and t.ndim == 2 and pins.shape[0] == 1 and t.shape[1] == 1 and t.shape[0] > 1:
            days, inv = np.unique(t[:, 0] // DAY_US, return_inverse=True)
            per_day = np.moveaxis(self.buckets(pins[0], days[:, None] * DAY_US), -1, 0)  # (W, days, N)
            return np.moveaxis(per_day[:, inv], 0, -1)  # window-major underneath, like TimeFields.buckets
        c = self.at(pins, t)
        return np.minimum(np.floor(2 * np.log2(1 + c)), N_COUNT_BUCKETS - 1).astype(np.int64)
