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
