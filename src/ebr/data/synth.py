"""The synthetic homefeed world (SYNTH.md): a generative process with every property
EVALUATION.md asks for, streamed to Parquet chunk by chunk.

Determinism: every random draw comes from a stream keyed by (seed, purpose, chunk index), so a
chunk is the same whichever process generates it and in whatever order.

Process, in short:
  interests  two-level taxonomy, centres in a latent space, Zipf popularity;
  pins       primary interest by popularity (+0-2 siblings), latent z near the centre, a content
             embedding = fixed projection of z + noise, birth time and an attention curve
             (evergreen or trending), lognormal quality, near-duplicate groups (one coarse image
             signature, distinct fine signatures, nearly the same z);
  users      1-7 latent interests (more for heavy users) with Dirichlet mixtures that drift over
             the period, a latent vector per interest, locale/age/gender, followed interests =
             noisy subset, lognormal activity;
  sessions   interest drawn from the current mixture; impressions drawn from pins of that
             interest born recently, reweighted (sampling-importance-resampling) by
             attention(t) x quality x exp(affinity / T);
  actions    ordinal logistic model of affinity, quality and cross terms (locale = pin language,
             age bucket x format) that need feature crossing: hide < impression < closeup < click
             < save; surfaces homefeed / search / related, with the sourcing interest logged for
             search and for the homefeed's interest feed.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebr.data.schema import TS
from ebr.data.validate import SourceWriter
from ebr.workspace import Workspace, write_json

DAY = 86400.0
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

PARENT_NAMES = (
    "home decor", "recipes", "womens fashion", "travel", "diy crafts", "beauty", "fitness", "art",
    "gardening", "weddings", "mens fashion", "photography", "tattoos", "cars", "quotes", "animals",
)
LOCALES = ("en-US", "es-MX", "fr-FR", "de-DE", "pt-BR", "ja-JP")
LOCALE_P = (0.5, 0.14, 0.1, 0.09, 0.1, 0.07)
LANGUAGES = ("en", "es", "fr", "de", "pt", "ja")  # LANGUAGES[i] is the language of LOCALES[i]
AGES = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_P = (0.22, 0.3, 0.22, 0.14, 0.12)
GENDERS = ("f", "m", "u")
GENDER_P = (0.6, 0.32, 0.08)
FORMATS = ("image", "video", "carousel")
FORMAT_P = (0.72, 0.2, 0.08)
# Logit bonus of age bucket x format: the young watch video, the old do not (a pure cross term).
AGE_FORMAT = np.array(
    [[-0.4, 1.2, 0.3], [-0.2, 0.8, 0.2], [0.2, -0.2, 0.0], [0.5, -0.8, -0.2], [0.7, -1.2, -0.4]],
    dtype=np.float32,
)
LANG_MATCH, LANG_MISMATCH = 1.0, -1.0
# Ordinal thresholds on the action score: hide < impression < closeup < click < save.
THRESHOLDS = np.array([-4.2, 0.1, 1.4, 2.6], dtype=np.float32)
ACTION_CODES = np.array(["hide", "impression", "closeup", "click", "save"])


@dataclass(frozen=True)
class SynthConfig:
    n_users: int
    n_pins: int
    n_parents: int
    n_sub: int
    days: int
    rows_per_user: float  # mean impressions logged per user over the period
    chunk_users: int
    dim: int = 32  # latent space
    emb_dim: int = 64  # observed content embedding
    imps_per_session: float = 8.0
    candidates: int = 6  # SIR proposals per impression
    affinity_temp: float = 0.12
    dup_share: float = 0.2  # pins that re-upload an earlier image
    trending_share: float = 0.1
    history_days_before: int = 60  # pins exist before the log starts
    seed: int = 0


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(n_users=400, n_pins=3000, n_parents=4, n_sub=4, days=56, rows_per_user=80, chunk_users=200),
    "small": SynthConfig(
        n_users=12000, n_pins=60000, n_parents=8, n_sub=8, days=120, rows_per_user=85, chunk_users=2000
    ),
    "large": SynthConfig(
        n_users=1_000_000, n_pins=2_000_000, n_parents=16, n_sub=16, days=180, rows_per_user=100,
        chunk_users=20000, candidates=4,
    ),
}


def _rng(seed: int, purpose: int, chunk: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, chunk])


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-9)).astype(np.float32)


def _zipf(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return (p / p.sum())[rng.permutation(n)]


class World:
    """The global (non-user) part of the world: interests and pins, held in memory."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = c = cfg
        rng = _rng(c.seed, 1)
        K = self.n_interests = c.n_parents * c.n_sub
        parent_c = rng.normal(size=(c.n_parents, c.dim)).astype(np.float32)
        self.parent = np.repeat(np.arange(c.n_parents), c.n_sub)
        self.centres = _normalise(parent_c[self.parent] * 1.0 + 0.75 * rng.normal(size=(K, c.dim)))
        self.popularity = _zipf(K, 1.0, rng)
        self.interest_ids = np.array([f"i{k}" for k in range(K)])
        self.interest_names = np.array(
            [f"{PARENT_NAMES[p % len(PARENT_NAMES)]}{'' if p < len(PARENT_NAMES) else p}/{k % c.n_sub}"
             for k, p in enumerate(self.parent)]
        )
        # ---- pins
        N = c.n_pins
        rng = _rng(c.seed, 2)
        primary = rng.choice(K, size=N, p=self.popularity)
        n_extra = rng.choice(3, size=N, p=(0.5, 0.35, 0.15))
        sib = self.parent[primary, None] * c.n_sub + rng.integers(0, c.n_sub, size=(N, 2))
        inter = np.where(np.arange(2)[None, :] < n_extra[:, None], sib, -1)
        inter = np.where(inter == primary[:, None], -1, inter)
        birth = rng.uniform(-c.history_days_before, c.days, size=N).astype(np.float32)
        trending = rng.random(N) < c.trending_share
        decay = np.where(trending, rng.uniform(1.5, 5.0, N), rng.lognormal(np.log(25), 0.8, N)).astype(np.float32)
        peak = np.where(trending, rng.uniform(3.0, 8.0, N), 1.0).astype(np.float32)
        quality = rng.lognormal(0.0, 0.5, N).astype(np.float32)
        z = _normalise(self.centres[primary] + 0.8 * rng.normal(size=(N, c.dim)) / np.sqrt(c.dim))
        # near-duplicates: a re-upload copies an earlier original of the same primary interest
        is_dup = rng.random(N) < c.dup_share
        order = np.argsort(primary * 1e6 + rng.random(N), kind="stable")
        originals = order[~is_dup[order]]
        orig_primary = primary[originals]
        starts = np.searchsorted(orig_primary, np.arange(K))
        ends = np.searchsorted(orig_primary, np.arange(K), side="right")
        dup_idx = np.flatnonzero(is_dup & (ends[primary] > starts[primary]))
        pick = starts[primary[dup_idx]] + (
            rng.random(dup_idx.size) * (ends - starts)[primary[dup_idx]]
        ).astype(np.int64)
        orig = originals[pick]
        self.dup_of = np.full(N, -1, dtype=np.int64)
        self.dup_of[dup_idx] = orig
        z[dup_idx] = _normalise(z[orig] + 0.05 * rng.normal(size=(dup_idx.size, c.dim)) / np.sqrt(c.dim))
        inter[dup_idx] = inter[orig]
        birth[dup_idx] = np.maximum(birth[dup_idx], birth[orig] + rng.uniform(0.5, 20, dup_idx.size))
        self.primary, self.extra_interests, self.birth = primary, inter, birth
        self.trending, self.decay, self.peak, self.quality, self.z = trending, decay, peak, quality, z
        self.language = rng.choice(len(LANGUAGES), size=N, p=LOCALE_P)
        self.format = rng.choice(len(FORMATS), size=N, p=FORMAT_P)
        self.domain = (self.parent[primary] * 40 + rng.integers(0, 40, N)) % 997
        self.aspect = rng.lognormal(np.log(0.67), 0.25, N).astype(np.float32)
        proj = rng.normal(size=(c.dim, c.emb_dim)).astype(np.float32) / np.sqrt(c.dim)
        self.proj = proj
        self.pin_ids = pa.array(np.char.add("p", np.arange(N).astype(str)))
        # index: per interest, its pins sorted by birth (membership includes extra interests)
        member_pin = np.concatenate([np.arange(N)] + [np.flatnonzero(inter[:, j] >= 0) for j in range(2)])
        member_int = np.concatenate([primary] + [inter[inter[:, j] >= 0, j] for j in range(2)])
        key = member_int.astype(np.float64) * 1e4 + birth[member_pin]
        o = np.argsort(key, kind="stable")
        self.idx_key, self.idx_pin = key[o], member_pin[o]
        self.idx_start = np.searchsorted(self.idx_key, np.arange(K) * 1e4 - 1e3)
        self.idx_end = np.searchsorted(self.idx_key, np.arange(K) * 1e4 + 5e3)

    def attention(self, pins: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Rise over half a day, then exponential decay; trending pins peak high and fade fast."""
        age = t - self.birth[pins]
        a = self.peak[pins] * (1.0 - np.exp(-np.maximum(age, 0) / 0.5)) * np.exp(-np.maximum(age, 0) / self.decay[pins])
        return np.where(age >= 0, a, 0.0).astype(np.float32)

    # ---- tables of the global part --------------------------------------------------------
    def interests_table(self) -> pa.Table:
        parent_ids = [f"top{p}" for p in self.parent]
        return pa.table({"interest_id": self.interest_ids, "name": self.interest_names, "parent_id": parent_ids})

    def pins_tables(self, chunk: int = 200_000) -> Iterator[pa.Table]:
        c = self.cfg
        for lo in range(0, c.n_pins, chunk):
            hi = min(lo + chunk, c.n_pins)
            rng = _rng(c.seed, 3, lo // chunk)
            idx = np.arange(lo, hi)
            emb = _normalise(self.z[idx] @ self.proj + 0.4 * rng.normal(size=(hi - lo, c.emb_dim)) / np.sqrt(c.emb_dim))
            coarse_src = np.where(self.dup_of[idx] >= 0, self.dup_of[idx], idx)
            ints = np.concatenate([self.primary[idx, None], self.extra_interests[idx]], axis=1)
            lists = [[f"i{k}" for k in row if k >= 0] for row in ints]
            yield pa.table(
                {
                    "pin_id": self.pin_ids[lo:hi],
                    "image_sig": np.char.add("f", idx.astype(str)),
                    "image_sig_coarse": np.char.add("c", coarse_src.astype(str)),
                    "interests": pa.array(lists, type=pa.list_(pa.string())),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), c.emb_dim).cast(
                        pa.list_(pa.float32())
                    ),
                    "cat_language": np.array(LANGUAGES)[self.language[idx]],
                    "cat_format": np.array(FORMATS)[self.format[idx]],
                    "cat_domain": np.char.add("d", self.domain[idx].astype(str)),
                    "num_aspect_ratio": self.aspect[idx],
                    "created_at": pa.array(((START.timestamp() + self.birth[idx].astype(np.float64) * DAY) * 1e6)
                                           .astype(np.int64), type=pa.int64()).cast(TS),
                }
            )

    def pins_truth(self) -> pa.Table:
        return pa.table(
            {
                "pin_id": self.pin_ids,
                "primary_interest": self.interest_ids[self.primary],
                "birth_day": self.birth,
                "decay_days": self.decay,
                "trending": self.trending,
                "quality": self.quality,
                "dup_of": self.dup_of,
            }
        )


@dataclass
class UserChunk:
    lo: int
    ids: pa.Array
    n_int: np.ndarray  # (U,)
    interests: np.ndarray  # (U, 7) interest index, -1 padding
    w0: np.ndarray  # (U, 7) mixture at the start
    w1: np.ndarray  # (U, 7) mixture at the end
    vec: np.ndarray  # (U, 7, d) latent vector per interest
    activity: np.ndarray  # sessions per week
    locale: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    followed: list


def make_users(world: World, chunk: int) -> UserChunk:
    c = world.cfg
    lo = chunk * c.chunk_users
    U = min(c.chunk_users, c.n_users - lo)
    rng = _rng(c.seed, 4, chunk)
    K = world.n_interests
    weeks = c.days / 7.0
    mean_rate = c.rows_per_user / (c.imps_per_session * weeks)
    activity = rng.lognormal(np.log(mean_rate) - 0.5 * 0.9**2, 0.9, U).astype(np.float32)
    p = 0.08 + 0.6 / (1.0 + np.exp(-np.log(activity / mean_rate)))
    n_int = np.clip(1 + rng.binomial(6, p * 0.6), 1, 7)
    g = np.log(world.popularity)[None, :] + rng.gumbel(size=(U, K))
    top = np.argsort(-g, axis=1)[:, :7]
    interests = np.where(np.arange(7)[None, :] < n_int[:, None], top, -1)
    alpha = np.where(interests >= 0, 1.0, 1e-9)
    w0 = rng.gamma(alpha * 1.2)
    w0 = np.where(interests >= 0, w0, 0)
    w0 /= w0.sum(1, keepdims=True)
    w1 = rng.gamma(np.maximum(w0 * 20, 1e-9))
    w1 = np.where(interests >= 0, w1, 0)
    w1 /= w1.sum(1, keepdims=True)
    safe = np.maximum(interests, 0)
    vec = _normalise(world.centres[safe] + 0.6 * rng.normal(size=(U, 7, c.dim)) / np.sqrt(c.dim))
    locale = rng.choice(len(LOCALES), size=U, p=LOCALE_P)
    age = rng.choice(len(AGES), size=U, p=AGE_P)
    gender = rng.choice(len(GENDERS), size=U, p=GENDER_P)
    follow_mask = (rng.random((U, 7)) < 0.5) & (interests >= 0)
    stray = rng.integers(0, K, U)
    has_stray = rng.random(U) < 0.3
    followed = []
    for u in range(U):
        f = [f"i{k}" for k in interests[u][follow_mask[u]]]
        if has_stray[u] and stray[u] not in interests[u]:
            f.append(f"i{stray[u]}")
        followed.append(f)
    ids = pa.array(np.char.add("u", np.arange(lo, lo + U).astype(str)))
    return UserChunk(lo, ids, n_int, interests, w0, w1, vec, activity, locale, age, gender, followed)


def users_table(uc: UserChunk) -> pa.Table:
    return pa.table(
        {
            "user_id": uc.ids,
            "followed_interests": pa.array(uc.followed, type=pa.list_(pa.string())),
            "cat_locale": np.array(LOCALES)[uc.locale],
            "cat_age_bucket": np.array(AGES)[uc.age],
            "cat_gender": np.array(GENDERS)[uc.gender],
        }
    )


def users_truth(world: World, uc: UserChunk) -> pa.Table:
    ints = [[f"i{k}" for k in row if k >= 0] for row in uc.interests]
    w0 = [list(r[:n]) for r, n in zip(uc.w0.astype(np.float32), uc.n_int)]
    w1 = [list(r[:n]) for r, n in zip(uc.w1.astype(np.float32), uc.n_int)]
    return pa.table(
        {"user_id": uc.ids, "interests": ints, "weights_start": w0, "weights_end": w1, "sessions_per_week": uc.activity}
    )


def engagements_table(world: World, uc: UserChunk, chunk: int, slot_batch: int = 400_000) -> pa.Table:
    """All impressions of one chunk of users, one row each with the strongest action reached."""
    c = world.cfg
    rng = _rng(c.seed, 5, chunk)
    U = len(uc.activity)
    n_sess = rng.poisson(uc.activity * c.days / 7.0)
    s_user = np.repeat(np.arange(U), n_sess)
    S = s_user.size
    s_t = rng.uniform(0, c.days, S).astype(np.float32)
    f = (s_t / c.days)[:, None]
    w = (1 - f) * uc.w0[s_user] + f * uc.w1[s_user]
    cum = np.cumsum(w, axis=1)
    slot = (rng.random(S)[:, None] * cum[:, -1:] > cum).sum(1).clip(0, 6)
    s_slot = np.minimum(slot, uc.n_int[s_user] - 1)
    s_int = uc.interests[s_user, s_slot]
    s_surface = rng.choice(3, size=S, p=(0.7, 0.2, 0.1))  # homefeed, search, related
    interest_feed = (s_surface == 0) & (rng.random(S) < 0.3)
    s_cond = np.where((s_surface == 1) | interest_feed, s_int, -1)
    n_imp = 1 + rng.poisson(c.imps_per_session - 1, S)
    i_sess = np.repeat(np.arange(S), n_imp)
    n = i_sess.size
    # seconds since the session started: cumulative gaps, restarted at each session
    gaps = rng.uniform(5, 90, n)
    csum = np.cumsum(gaps)
    first = np.cumsum(n_imp) - n_imp
    within = csum - np.repeat(csum[first] - gaps[first], n_imp)
    t_days = s_t[i_sess] + (within / DAY).astype(np.float32)
    pins = np.empty(n, dtype=np.int64)
    aff = np.empty(n, dtype=np.float32)
    M = c.candidates
    for lo in range(0, n, slot_batch):
        hi = min(lo + slot_batch, n)
        sess = i_sess[lo:hi]
        k = s_int[sess]
        tt = t_days[lo:hi]
        start, end = world.idx_start[k], world.idx_end[k]
        base = k.astype(np.float64) * 1e4
        born = np.searchsorted(world.idx_key, base + tt) - start  # pins born before t
        recent = born - (np.searchsorted(world.idx_key, base + tt - 45.0) - start)
        born = np.maximum(born, 1)
        recent = np.maximum(recent, 1)
        m = hi - lo
        use_recent = rng.random((m, M)) < 0.8
        u = rng.random((m, M))
        off_recent = born[:, None] - 1 - (u * recent[:, None]).astype(np.int64)
        off_any = (u * born[:, None]).astype(np.int64)
        off = np.where(use_recent, off_recent, off_any)
        pos = np.minimum(start[:, None] + off, end[:, None] - 1)
        cand = world.idx_pin[pos]
        in_recent = off >= (born - recent)[:, None]
        q = 0.2 / born[:, None] + np.where(in_recent, 0.8 / recent[:, None], 0.0)
        uv = uc.vec[s_user[sess], s_slot[sess]]  # (m, d)
        a = np.einsum("md,mcd->mc", uv, world.z[cand])
        logw = (
            np.log(world.attention(cand, tt[:, None]) + 1e-6)
            + 0.5 * np.log(world.quality[cand])
            + a / c.affinity_temp
            - np.log(q)
            + rng.gumbel(size=(m, M))
        )
        j = np.argmax(logw, axis=1)
        pins[lo:hi] = cand[np.arange(m), j]
        aff[lo:hi] = a[np.arange(m), j]
    users = s_user[i_sess]
    score = (
        7.0 * (aff - 0.69)
        + 0.6 * np.log(world.quality[pins])
        + np.where(world.language[pins] == uc.locale[users], LANG_MATCH, LANG_MISMATCH)
        + AGE_FORMAT[uc.age[users], world.format[pins]]
        + rng.logistic(size=n).astype(np.float32)
    )
    action = ACTION_CODES[np.searchsorted(THRESHOLDS, score)]
    surface = np.array(["homefeed", "search", "related"])[s_surface[i_sess]]
    cond = s_cond[i_sess]
    cond_arr = pa.array(np.char.add("i", np.maximum(cond, 0).astype(str)), mask=cond < 0)
    ts_us = (START.timestamp() + t_days.astype(np.float64) * DAY) * 1e6
    order = np.lexsort((ts_us, users))
    return pa.table(
        {
            "user_id": uc.ids.take(pa.array(users[order])),
            "pin_id": world.pin_ids.take(pa.array(pins[order])),
            "ts": pa.array(ts_us[order].astype(np.int64), type=pa.int64()).cast(TS),
            "action": action[order],
            "weight": np.ones(n, dtype=np.float32),
            "surface": surface[order],
            "condition_interest": cond_arr.take(pa.array(order)),
        }
    )


def generate(ws: Workspace, preset: str = "small", seed: int = 0, progress: bool = True, **overrides) -> dict:
    """Write the synthetic world into the workspace as source 'synth' (replacing an earlier one)."""
    from ebr.log import bar as progress_bar

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(PRESETS[preset], seed=seed, **overrides)
    t0 = time.time()
    world = World(cfg)
    n_chunks = -(-cfg.n_users // cfg.chunk_users)
    truth = ws.truth_dir
    truth.mkdir(parents=True, exist_ok=True)
    with SourceWriter(ws, "synth", params={"preset": preset, **asdict(cfg)}, quiet=not progress) as w:
        w.write("interests", world.interests_table())
        w.seal("interests")
        for tbl in world.pins_tables():
            w.write("pins", tbl)
        w.seal("pins")
        np.save(truth / "interest_centres.npy", world.centres)
        pq.write_table(world.pins_truth(), truth / "pins.parquet")
        user_truth = None
        user_parts = []
        for ch in range(n_chunks):
            uc = make_users(world, ch)
            w.write("users", users_table(uc))
            user_parts.append(users_truth(world, uc))
        w.seal("users")
        user_truth = pa.concat_tables(user_parts)
        pq.write_table(user_truth, truth / "users.parquet")
        del user_parts, user_truth
        bar = progress_bar(cfg.n_users, f"synth {preset}", progress, unit="user")
        for ch in range(n_chunks):
            uc = make_users(world, ch)
            w.write("engagements", engagements_table(world, uc, ch))
            bar.update(len(uc.activity))
        bar.close()
        w.extra = {"preset": preset, "seed": seed, "created_at": "birth time"}
        entry = w.commit()
    write_json(
        truth / "manifest.json",
        {
            "preset": preset,
            "seed": seed,
            "config": asdict(cfg),
            "note": "latent variables, for diagnostics only: models never read them",
        },
    )
    entry["wall_seconds"] = round(time.time() - t0, 2)
    return entry
