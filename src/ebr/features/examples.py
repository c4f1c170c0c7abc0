"""Point-in-time examples: engagements as arrays, histories as of a time, split parts.

Every feature of an example is computed from data strictly before the example's time: a user's
history is the last L non-impression engagements with ts < t (hides kept, marked by their action
code so pooling can skip them). Sources without time (adjacency splits) use the file order as time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebr.config import FeaturesConfig
from ebr.data.splits import GIVEN_VAL_FRACTION, Part, Split
from ebr.data.tables import connect, sql_str
from ebr.data.validate import DataError
from ebr.features.state import ACTION_CODE, FIRST_ID, FeatureState
from ebr.workspace import Workspace

T_MAX = np.iinfo(np.int64).max
NO_EVENT = np.iinfo(np.int64).min  # Histories.last_time of an empty history


@dataclass
class Engagements:
    """All engagements as arrays sorted by (user, t); t in microseconds (or file order)."""

    user: np.ndarray
    pin: np.ndarray
    t: np.ndarray
    action: np.ndarray  # ACTION_CODE
    weight: np.ndarray
    part: np.ndarray  # Part per engagement (train, validation, test)
    timed: bool = True  # t is microseconds of real time (False: a pseudo-time, the file order)
    cond: np.ndarray | None = None  # interest code that sourced the engagement (0: none logged)
    given_validation: str | None = None  # a given split's validation rows: random or last (None: other splits)
    line_order: str | None = None  # a given split's lines as detected (line_order: sorted, engagement, none)

    def conditions(self) -> np.ndarray:
        return np.zeros(len(self.user), dtype=np.int64) if self.cond is None else self.cond

    def __len__(self) -> int:
        return len(self.user)


def given_validation(
    user: np.ndarray, train: np.ndarray, seed: int, fraction: float = GIVEN_VAL_FRACTION, mode: str = "random"
) -> np.ndarray:
    """`fraction` of each user's training rows (rounded, per user): a seeded random draw (`random`),
    or the user's last rows in file order (`last`); rows must be in a deterministic order (here: by
    user, then file position). Returns a bool mask."""
    idx = np.flatnonzero(train)
    u = user[idx]
    if mode == "last":  # descending position within the user: the last rows come first
        key = -np.arange(len(idx), dtype=np.float64)
    else:
        key = np.random.default_rng([seed, 0x5EED]).random(len(idx))
    order = np.lexsort((key, u))  # each user's rows in a random order (last: latest first)
    su = u[order]
    first = np.searchsorted(su, su, side="left")
    rank = np.arange(len(su)) - first
    n_u = np.bincount(su, minlength=int(su.max()) + 1 if len(su) else 0)[su]
    out = np.zeros(len(user), dtype=bool)
    out[idx[order[rank < np.floor(n_u * fraction + 0.5)]]] = True
    return out


LINE_ORDER_USERS = 20_000  # line_order reads at most this many users (a seeded sample)


def _pairs(user: np.ndarray, pin: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive same-user item pairs, rows taken in `order`: (unordered pair key, whether the
    pair ascends in pin code)."""
    u, p = user[order], pin[order]
    same = (u[1:] == u[:-1]) & (p[1:] != p[:-1])
    a, b = p[:-1][same].astype(np.int64), p[1:][same].astype(np.int64)
    return np.minimum(a, b) * (int(pin.max()) + 1) + np.maximum(a, b), a < b


def _repeated_pairs(user: np.ndarray, pin: np.ndarray, order: np.ndarray) -> float:
    """The share of consecutive (same-user) item pairs, rows taken in `order`, that occur as a
    consecutive pair (either way round) more than once in the data."""
    key, _ = _pairs(user, pin, order)
    if len(key) == 0:
        return 0.0
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    return float((counts[inv] >= 2).mean())


def _one_way_share(user: np.ndarray, pin: np.ndarray) -> float:
    """Among consecutive pairs that recur, the share always seen in the same direction: 1 for lines
    sorted by any strict key (ids up or down, ids as text; a key with ties, e.g. popularity, less),
    0.40 in ML-100K's engagement order."""
    key, up = _pairs(user, pin, np.arange(len(user)))
    if len(key) == 0:
        return 0.0
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    ups = np.bincount(inv, weights=up, minlength=len(uniq))
    rec = counts >= 2
    return float(((ups[rec] == 0) | (ups[rec] == counts[rec])).mean()) if rec.any() else 0.0


def _sorted_lines(user: np.ndarray, key: np.ndarray, share: float = 0.9) -> bool:
    """Whether at least `share` of the users with 3+ rows list their items in ascending or in
    descending `key` order (rows sorted by user, then file position)."""
    same = user[1:] == user[:-1]
    n = np.bincount(user, minlength=int(user.max()) + 1)
    judged = n >= 3
    if not judged.any():
        return False
    for desc in (False, True):
        out = (key[1:] > key[:-1]) if desc else (key[1:] < key[:-1])
        against = np.bincount(user[1:][same & out], minlength=len(n))
        if float((against[judged] == 0).mean()) >= share:
            return True
    return False


def line_order(user: np.ndarray, pin: np.ndarray, pin_ids: pa.Array | pa.ChunkedArray | list, train: np.ndarray,
               seed: int = 0) -> str:
    """How a given split's training lines order each user's items (rows sorted by user, then file
    position; at most LINE_ORDER_USERS users, a seeded sample, are read): `sorted` where 90%+ of
    the users with 3+ rows list them in ascending or descending id order (numeric ids as numbers
    or as text; LightGCN-style files: the order is the ids', no time; a random order of n items is
    sorted with probability 2/n!) or where the recurring consecutive pairs (below) nearly always
    (90%+) run one way, as under any strict sort key; `engagement` where the order carries information,
    as engagement order does: consecutive items recur as consecutive pairs in other users' lines
    clearly more often than in the same lines shuffled within each user (3 seeded shuffles; more
    than 10% and 5 standard deviations above their mean; ML-100K in time order 0.53 against
    0.38, its recurring pairs one way in 0.40); else `none` (lines in a random order)."""
    idx = np.flatnonzero(train)
    if len(idx) == 0:
        return "none"
    users = np.unique(user[idx])
    rng = np.random.default_rng([seed, 0x0D3])
    if len(users) > LINE_ORDER_USERS:
        idx = idx[np.isin(user[idx], rng.choice(users, LINE_ORDER_USERS, replace=False))]
    u, p = user[idx], pin[idx]
    ids = (pin_ids if isinstance(pin_ids, (pa.Array, pa.ChunkedArray)) else pa.array(pin_ids)).take(pa.array(idx))
    ids = ids.cast(pa.string())
    keys = [np.unique(ids.to_numpy(zero_copy_only=False).astype(str), return_inverse=True)[1]]
    try:
        keys.append(ids.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if any(_sorted_lines(u, k) for k in keys) or _one_way_share(u, p) >= 0.9:
        return "sorted"
    shuffled = [_repeated_pairs(u, p, np.lexsort((rng.random(len(u)), u))) for _ in range(3)]
    f, m, sd = _repeated_pairs(u, p, np.arange(len(u))), float(np.mean(shuffled)), float(np.std(shuffled, ddof=1))
    return "engagement" if f > m * 1.1 and f > m + 5 * sd else "none"


def load_engagements(ws: Workspace, fs: FeatureState, split: Split, seed: int = 0,
                     given_validation_mode: str = "auto") -> Engagements:
    """Every engagement with its part of the split, in a deterministic order (the same arrays in
    every process: the query is ordered, and pseudo-time is the stored file position). A given
    split's validation rows (data.given_validation): `random`, `last` (each user's last training
    rows in file order), or `auto`: the last rows where the lines are in engagement order
    (line_order), as such a file's test is each user's last rows, else random."""
    con = connect(ws)
    given = split.kind == "given"
    cols, join = "NULL AS pos, false AS is_test", ""
    if given:
        con.execute(f"CREATE VIEW assignment AS SELECT * FROM read_parquet('{sql_str(split.path)}/assignment.parquet')")
        if "pos" not in [c[0] for c in con.execute("DESCRIBE assignment").fetchall()]:
            raise DataError(f"split {split.name!r} predates stored file positions: import the adjacency files again")
        cols = "a.pos, coalesce(a.is_test, false) AS is_test"
        join = ("LEFT JOIN (SELECT user_id, pin_id, min(pos) AS pos, bool_or(part = 'test') AS is_test "
                "FROM assignment GROUP BY user_id, pin_id) a ON a.user_id = e.user_id AND a.pin_id = e.pin_id")
    t = con.sql(
        f"""SELECT e.user_id, e.pin_id, e.action, e.weight, epoch_us(e.ts) AS t, e.condition_interest, {cols},
                  row_number() OVER (PARTITION BY e.user_id ORDER BY e.ts NULLS LAST, e.pin_id, e.action) AS rn
           FROM engagements e {join}
           ORDER BY e.user_id, e.ts NULLS LAST, pos NULLS FIRST, e.pin_id, e.action, e.weight"""
    ).to_arrow_table()
    user = fs.users.encode(t["user_id"])
    pin = fs.pins.encode(t["pin_id"])
    tt = t["t"].to_numpy(zero_copy_only=False)
    has_time = not np.isnan(tt.astype(np.float64)).any()
    part = np.full(len(user), Part.TRAIN, dtype=np.int8)
    if given:
        part[t["is_test"].to_numpy(zero_copy_only=False)] = Part.TEST
        tt = t["pos"].to_numpy(zero_copy_only=False)
        tt = np.where(np.isnan(tt.astype(np.float64)), -1, tt).astype(np.int64)  # rows of other sources: first
        order = np.lexsort((tt, user))
        user, pin, tt, part = user[order], pin[order], tt[order], part[order]
        t = t.take(pa.array(order))
        mode, lines = given_validation_mode, None
        if mode == "auto":
            lines = line_order(user, pin, t["pin_id"], part == Part.TRAIN)
            mode = "last" if lines == "engagement" else "random"
        part[given_validation(user, part == Part.TRAIN, seed, mode=mode)] = Part.VALIDATION
    elif split.kind == "temporal":
        if not has_time:
            raise DataError("a temporal split needs timestamps; this data has none (use the given split)")
        tt = tt.astype(np.int64)
        val_cut, cut = (int(split.val_cut.timestamp() * 1e6), int(split.cut.timestamp() * 1e6))
        part[(tt >= val_cut) & (tt < cut)] = Part.VALIDATION
        part[tt >= cut] = Part.TEST
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
        part[tt >= val_t[user]] = Part.VALIDATION
        part[tt >= test_t[user]] = Part.TEST
    action = np.array([ACTION_CODE.get(a, 0) for a in t["action"].to_pylist()], dtype=np.int64)
    w = t["weight"].to_numpy(zero_copy_only=False).astype(np.float32)
    cond = fs.interests.encode(t["condition_interest"])
    cond = np.where(cond >= FIRST_ID, cond, 0)  # null (none logged) -> 0
    order = np.lexsort((tt, user))  # stable: ties keep the query's deterministic order
    timed = has_time and not given  # given: pseudo-time = file position; no-time leave-last-out: row order
    return Engagements(user[order], pin[order], tt[order], action[order], w[order], part[order], timed,
                       cond[order], mode if given else None, lines if given else None)


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
    def build(cls, e: Engagements, n_users: int, visible: np.ndarray | None = None) -> Histories:
        m = e.action != ACTION_CODE["impression"]
        if visible is not None:
            m &= visible
        user, pin, t, action = e.user[m], e.pin[m], e.t[m], e.action[m]
        times = np.unique(t)
        R = len(times) + 1
        key = user * R + np.searchsorted(times, t)
        start = np.searchsorted(user, np.arange(n_users + 1))
        return cls(user, pin, t, action, times, key, start, R)

    def at(self, users: np.ndarray, t: np.ndarray, L: int,
           back: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Last L events of each user strictly before t: (pins (n, L), actions (n, L)), padding
        (0) on the left, most recent on the right. back (n,): end each history that many events
        earlier (the training horizon: the history as of an earlier engagement of the user)."""
        users = np.asarray(users, dtype=np.int64)
        j = self._end(users, t, back)
        idx = j[:, None] - L + np.arange(L)[None, :]
        valid = idx >= self.start[users][:, None]
        idx = np.clip(idx, 0, max(len(self.pin) - 1, 0))
        if len(self.pin) == 0:
            z = np.zeros((len(users), L), dtype=np.int64)
            return z, z.copy()
        return np.where(valid, self.pin[idx], 0), np.where(valid, self.action[idx], 0)

    def _end(self, users: np.ndarray, t: np.ndarray, back: np.ndarray | None = None) -> np.ndarray:
        """(n,) the index one past each user's last event strictly before t (`back` events earlier);
        events before the user's first are the callers' to mask."""
        t = np.asarray(t, dtype=np.int64)
        rank = np.where(t == T_MAX, self.R - 1, np.searchsorted(self.times, t, side="left"))
        j = np.searchsorted(self.key, users * self.R + rank, side="left")
        return j if back is None else j - np.asarray(back, dtype=np.int64)

    def last_time(self, users: np.ndarray, t: np.ndarray, back: np.ndarray | None = None) -> np.ndarray:
        """(n,) the time of each user's last event strictly before t (the history's most recent
        event, Histories.at with the same `back`); NO_EVENT where the history is empty."""
        users = np.asarray(users, dtype=np.int64)
        j = self._end(users, t, back) - 1
        has = j >= self.start[users]
        return np.where(has, self.t[np.clip(j, 0, max(len(self.t) - 1, 0))] if len(self.t) else 0, NO_EVENT)


def existing_pins(e: Engagements, visible: np.ndarray, n_pins: int) -> np.ndarray:
    """(n_pins,) bool: pins that exist at the as-of time, i.e. have an engagement (any action) among
    the visible ones. A pin first engaged with later is a candidate for no model and no peer."""
    out = np.zeros(n_pins, dtype=bool)
    out[e.pin[visible]] = True
    out[:FIRST_ID] = False  # padding and out-of-vocabulary rows are not pins
    return out


@dataclass
class Examples:
    """Training (or validation) pairs: the user as of t, a positive pin, a weight."""

    user: np.ndarray
    pin: np.ndarray
    t: np.ndarray
    weight: np.ndarray
    cond: np.ndarray  # the logged source interest (0: none)


def draw_conditions(logged: np.ndarray, pin_interests: np.ndarray, source: str, dropout: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Training conditions of a conditional model (TECHNIQUES.md 7): the logged source interest
    where there is one and `source` is "logged", else one of the target pin's interests at random
    (`pin_interests` (B, K) codes of each row's target, PAD-filled; 0 when it has none); then a
    share `dropout` of rows set to 0 (no condition). (B,) interest codes."""
    n = (pin_interests > 0).sum(1)
    pick = np.minimum((rng.random(len(n)) * n).astype(np.int64), np.maximum(n - 1, 0))
    drawn = np.where(n > 0, pin_interests[np.arange(len(n)), pick], 0)
    out = np.where(logged > 0, logged, drawn) if source == "logged" else drawn
    return np.where(rng.random(len(n)) < dropout, 0, out)


def positive_examples(e: Engagements, cfg: FeaturesConfig, parts: tuple[int, ...],
                      within: np.ndarray | None = None) -> Examples:
    """The positive engagements of `parts` (and of the `within` mask, when given) as examples."""
    pos_codes = np.array([ACTION_CODE[a] for a in cfg.positive_actions])
    w_by_code = np.zeros(max(ACTION_CODE.values()) + 1, dtype=np.float32)
    for a, w in cfg.action_weights.items():
        w_by_code[ACTION_CODE[a]] = w
    m = np.isin(e.action, pos_codes) & np.isin(e.part, parts)
    if within is not None:
        m &= within
    w = np.where(w_by_code[e.action[m]] > 0, w_by_code[e.action[m]], 1.0) * e.weight[m]
    return Examples(e.user[m], e.pin[m], e.t[m], w.astype(np.float32), e.conditions()[m])


def _mean_one(r: np.ndarray) -> np.ndarray:
    """Loss weights rescaled to mean 1 (float32): the loss's scale, and so the step size, stays that
    of unweighted data."""
    return (r / r.mean()).astype(np.float32) if len(r) else r.astype(np.float32)


def recency_weights(t: np.ndarray, as_of: int, half_life_days: float) -> np.ndarray:
    """(N,) float32 weights 2^(-(as_of - t) / half-life) of examples at times t (microseconds),
    rescaled to mean 1 (the loss's scale, and so the step size, stays that of unweighted data)."""
    age_days = (as_of - np.asarray(t, dtype=np.float64)) / (86400 * 1e6)
    r = np.exp2(-np.maximum(age_days, 0.0) / half_life_days)
    return _mean_one(r)


def user_weights(user: np.ndarray, power: float) -> np.ndarray:
    """(N,) float32 weights n_u^-power of examples of users `user` (n_u: the user's examples here),
    rescaled to mean 1: power 1 gives every user the same total weight, 0 every example."""
    _, inv, n = np.unique(np.asarray(user), return_inverse=True, return_counts=True)
    r = n[inv].astype(np.float64) ** -power
    return _mean_one(r)


def first_day_weights(user: np.ndarray, t: np.ndarray, weight: float, day_us: int = 86400 * 10**6) -> np.ndarray:
    """(N,) float32 weights of examples of users `user` at times `t` (microseconds): `weight` for an
    example within a day of its user's first example here (the sign-up session: on MovieLens most
    of a user's ratings), 1 for the later ones (a returning user's), rescaled to mean 1."""
    user, t = np.asarray(user), np.asarray(t, dtype=np.int64)
    _, inv = np.unique(user, return_inverse=True)
    first = np.full(inv.max() + 1 if len(inv) else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inv, t)
    r = np.where(t < first[inv] + day_us, weight, 1.0)
    return _mean_one(r)


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


def eval_spec(
    e: Engagements,
    cfg: FeaturesConfig,
    target_part: int = Part.TEST,
    train_parts: tuple[int, ...] = (Part.TRAIN, Part.VALIDATION),
    max_users: int | None = None,
    seed: int = 0,
) -> EvalSpec:
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
