"""Point-in-time examples: engagements as arrays, histories as of a time, split parts.

Every feature of an example is computed from data strictly before the example's time: a user's
history is the last L non-impression engagements with ts < t (hides kept, marked by their action
code so pooling can skip them). Sources without time (adjacency splits) use the file order as time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ebr.config import FeaturesConfig
from ebr.data.splits import Split
from ebr.data.tables import connect
from ebr.features.state import ACTION_CODE, FeatureState
from ebr.workspace import Workspace

T_MAX = np.iinfo(np.int64).max


@dataclass
class Engagements:
    """All engagements as arrays sorted by (user, t); t in microseconds (or file order)."""

    user: np.ndarray
    pin: np.ndarray
    t: np.ndarray
    action: np.ndarray  # ACTION_CODE
    weight: np.ndarray
    part: np.ndarray  # 0 train, 1 validation, 2 test (per the split)

    def __len__(self) -> int:
        return len(self.user)


def load_engagements(ws: Workspace, fs: FeatureState, split: Split, seed: int = 0) -> Engagements:
    con = connect(ws)
    t = con.sql(
        """SELECT user_id, pin_id, action, weight, epoch_us(ts) AS t,
                  row_number() OVER (PARTITION BY user_id ORDER BY ts NULLS LAST) AS rn
           FROM engagements"""
    ).to_arrow_table()
    user = fs.users.encode(t["user_id"])
    pin = fs.pins.encode(t["pin_id"])
    tt = t["t"].to_numpy(zero_copy_only=False)
    has_time = not np.isnan(tt.astype(np.float64)).any()
    part = np.zeros(len(user), dtype=np.int8)
    if split.kind == "given":
        a = pq.read_table(f"{split.path}/assignment.parquet")
        # rows in file order: train pairs first, so 'time' = the row's position in the import
        key = pc.binary_join_element_wise(t["user_id"], t["pin_id"], "\t")
        test = a.filter(pc.equal(a["part"], "test"))
        test_keys = pc.binary_join_element_wise(test["user_id"], test["pin_id"], "\t")
        part[pc.is_in(key, value_set=test_keys.combine_chunks()).to_numpy(zero_copy_only=False)] = 2
        rng = np.random.default_rng(seed)
        part[(part == 0) & (rng.random(len(part)) < 0.1)] = 1  # validation: ~10% of training pins
        tt = t["rn"].to_numpy().astype(np.int64) + np.where(part == 2, 1 << 40, 0)
    elif split.kind == "temporal":
        if not has_time:
            raise ValueError("a temporal split needs timestamps; this data has none (use the given split)")
        tt = tt.astype(np.int64)
        val_cut, cut = (int(split.val_cut.timestamp() * 1e6), int(split.cut.timestamp() * 1e6))
        part[(tt >= val_cut) & (tt < cut)] = 1
        part[tt >= cut] = 2
    elif split.kind == "leave_last_out":
        tt = tt.astype(np.int64) if has_time else t["rn"].to_numpy().astype(np.int64)
        tg = pq.read_table(f"{split.path}/targets.parquet")
        tu = fs.users.encode(tg["user_id"])
        tts = tg["ts"].to_numpy(zero_copy_only=False).astype("datetime64[us]").astype(np.int64) if has_time else None
        test_t = np.full(len(fs.users), T_MAX, dtype=np.int64)
        val_t = np.full(len(fs.users), T_MAX, dtype=np.int64)
        rk = tg["rk"].to_numpy()
        if tts is not None:
            test_t[tu[rk == 1]] = tts[rk == 1]
            val_t[tu[rk == 2]] = tts[rk == 2]
        part[tt >= val_t[user]] = 1
        part[tt >= test_t[user]] = 2
    action = np.array([ACTION_CODE.get(a, 0) for a in t["action"].to_pylist()], dtype=np.int64)
    w = t["weight"].to_numpy(zero_copy_only=False).astype(np.float32)
    order = np.lexsort((tt, user))
    return Engagements(user[order], pin[order], tt[order], action[order], w[order], part[order])


@dataclass
class Histories:
    """Non-impression engagements sorted by (user, t), searchable as of any time."""

    user: np.ndarray
    pin: np.ndarray
    t: np.ndarray
    action: np.ndarray
    times: np.ndarray  # sorted distinct times
    key: np.ndarray  # user * R + rank(t), sorted
    start: np.ndarray  # (n_users + 1,) first event of each user
    R: int

    @classmethod
    def build(cls, e: Engagements, n_users: int, visible: np.ndarray | None = None) -> "Histories":
        m = e.action != ACTION_CODE["impression"]
        if visible is not None:
            m &= visible
        user, pin, t, action = e.user[m], e.pin[m], e.t[m], e.action[m]
        times = np.unique(t)
        R = len(times) + 1
        key = user * R + np.searchsorted(times, t)
        start = np.searchsorted(user, np.arange(n_users + 1))
        return cls(user, pin, t, action, times, key, start, R)

    def at(self, users: np.ndarray, t: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        """Last L events of each user strictly before t: (pins (n, L), actions (n, L)), padding
        (0) on the left, most recent on the right."""
        users = np.asarray(users, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        rank = np.where(t == T_MAX, self.R - 1, np.searchsorted(self.times, t, side="left"))
        j = np.searchsorted(self.key, users * self.R + rank, side="left")
        idx = j[:, None] - L + np.arange(L)[None, :]
        valid = idx >= self.start[users][:, None]
        idx = np.clip(idx, 0, max(len(self.pin) - 1, 0))
        if len(self.pin) == 0:
            z = np.zeros((len(users), L), dtype=np.int64)
            return z, z.copy()
        return np.where(valid, self.pin[idx], 0), np.where(valid, self.action[idx], 0)


@dataclass
class Examples:
    """Training (or validation) pairs: the user as of t, a positive pin, a weight."""

    user: np.ndarray
    pin: np.ndarray
    t: np.ndarray
    weight: np.ndarray


def positive_examples(e: Engagements, cfg: FeaturesConfig, parts: tuple[int, ...]) -> Examples:
    pos_codes = np.array([ACTION_CODE[a] for a in cfg.positive_actions])
    w_by_code = np.zeros(max(ACTION_CODE.values()) + 1, dtype=np.float32)
    for a, w in cfg.action_weights.items():
        w_by_code[ACTION_CODE[a]] = w
    m = np.isin(e.action, pos_codes) & np.isin(e.part, parts)
    w = np.where(w_by_code[e.action[m]] > 0, w_by_code[e.action[m]], 1.0) * e.weight[m]
    return Examples(e.user[m], e.pin[m], e.t[m], w.astype(np.float32))


@dataclass
class EvalSpec:
    """Who is evaluated, against which targets, excluding what. Histories for evaluation are
    built from the training parts only (``Histories.build(..., visible=...)``) and read as of
    T_MAX, so nothing from the target part reaches the features."""

    users: np.ndarray  # warm users
    t: np.ndarray  # evaluation time per user (history strictly before it)
    targets: list[np.ndarray]
    exclude: list[np.ndarray]  # pins engaged with in training (ranked out)
    cold_users: np.ndarray
    cold_targets: list[np.ndarray]


def eval_spec(e: Engagements, cfg: FeaturesConfig, target_part: int = 2, train_parts: tuple[int, ...] = (0, 1),
              max_users: int | None = None, seed: int = 0) -> EvalSpec:
    """Targets = positive engagements in `target_part` whose pin the user did not engage with
    (any non-impression action) in the training parts. Warm users have at least one training
    engagement; the others are cold."""
    pos_codes = np.array([ACTION_CODE[a] for a in cfg.positive_actions])
    engaged = np.isin(e.part, train_parts) & (e.action != ACTION_CODE["impression"])
    tgt = (e.part == target_part) & np.isin(e.action, pos_codes)
    n_users = int(e.user.max()) + 1 if len(e.user) else 0
    bounds = np.searchsorted(e.user, np.arange(n_users + 1))
    users, times, targets, excl, cold, cold_t = [], [], [], [], [], []
    for u in np.unique(e.user[tgt]).tolist():
        lo, hi = bounds[u], bounds[u + 1]
        seen = np.unique(e.pin[lo:hi][engaged[lo:hi]])
        tpins = np.unique(e.pin[lo:hi][tgt[lo:hi]])
        tpins = tpins[~np.isin(tpins, seen)]
        if len(tpins) == 0:
            continue
        if len(seen) == 0:
            cold.append(u)
            cold_t.append(tpins)
            continue
        users.append(u)
        times.append(T_MAX)  # as of the end of the visible (training) parts
        targets.append(tpins)
        excl.append(seen)
    users_a = np.array(users, dtype=np.int64)
    if max_users is not None and len(users_a) > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(len(users_a), max_users, replace=False))
        users_a = users_a[keep]
        times = [times[i] for i in keep]
        targets = [targets[i] for i in keep]
        excl = [excl[i] for i in keep]
    return EvalSpec(users_a, np.array(times, dtype=np.int64), targets, excl, np.array(cold, dtype=np.int64), cold_t)
