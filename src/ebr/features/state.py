"""Vocabularies (0 = padding, 1 = out-of-vocabulary) and numeric statistics: the feature state
that a run saves and a bundle carries, and the per-pin / per-user feature arrays built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ebr.data.schema import ACTIONS
from ebr.data.tables import connect
from ebr.workspace import Workspace

PAD, OOV = 0, 1
FIRST_ID = 2  # codes below are reserved (padding, out-of-vocabulary); ids start here
# action codes: 0 = padding; impression=1, closeup=2, click=3, save=4, hide=5
ACTION_CODE = {a: i + 1 for i, a in enumerate(ACTIONS)}
HIDE = ACTION_CODE["hide"]
N_ACTION_CODES = len(ACTIONS) + 1


@dataclass
class Vocab:
    """Maps ids (strings) to dense ints from 2; unknown ids map to OOV (1)."""

    ids: list[str]
    _lookup: pa.Array | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:  # rows of the embedding table: padding + OOV + ids
        return len(self.ids) + 2

    @property
    def array(self) -> pa.Array:
        if self._lookup is None:
            self._lookup = pa.array(self.ids, type=pa.string())
        return self._lookup

    def encode(self, values) -> np.ndarray:
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(list(values), type=pa.string())
        idx = pc.index_in(arr.cast(pa.string()), value_set=self.array)
        out = idx.to_numpy(zero_copy_only=False)
        out = (
            np.where(np.isnan(out.astype(np.float64)), -1, out).astype(np.int64)
            if idx.null_count
            else out.astype(np.int64)
        )
        return np.where(out < 0, OOV, out + FIRST_ID)

    def decode(self, codes: np.ndarray) -> list[str | None]:
        return [self.ids[c - FIRST_ID] if c >= FIRST_ID else None for c in np.asarray(codes).tolist()]


@dataclass
class FeatureState:
    """Everything needed to turn rows into model inputs, saved with a run and a bundle."""

    pins: Vocab
    users: Vocab
    interests: Vocab
    pin_cat: dict[str, Vocab]
    user_cat: dict[str, Vocab]
    pin_num: dict[str, tuple[float, float]]  # column -> (mean, std)
    emb_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "pins": self.pins.ids,
            "users": self.users.ids,
            "interests": self.interests.ids,
            "pin_cat": {k: v.ids for k, v in self.pin_cat.items()},
            "user_cat": {k: v.ids for k, v in self.user_cat.items()},
            "pin_num": self.pin_num,
            "emb_dim": self.emb_dim,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureState:
        return cls(
            pins=Vocab(d["pins"]),
            users=Vocab(d["users"]),
            interests=Vocab(d["interests"]),
            pin_cat={k: Vocab(v) for k, v in d["pin_cat"].items()},
            user_cat={k: Vocab(v) for k, v in d["user_cat"].items()},
            pin_num={k: tuple(v) for k, v in d["pin_num"].items()},
            emb_dim=int(d["emb_dim"]),
        )

    @property
    def sizes(self) -> dict[str, Any]:
        """What the model needs to know to build its tables."""
        return {
            "n_pins": len(self.pins),
            "n_users": len(self.users),
            "n_interests": len(self.interests),
            "pin_cat": [len(v) for v in self.pin_cat.values()],
            "user_cat": [len(v) for v in self.user_cat.values()],
            "n_pin_num": len(self.pin_num),
            "emb_dim": self.emb_dim,
        }


def _columns(con, table: str, prefix: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0].startswith(prefix)]


def build_feature_state(ws: Workspace, min_count: int = 1) -> FeatureState:
    """Vocabularies over the pins/users/interests tables (every id gets a row; rare categorical
    values below `min_count` map to OOV) and numeric means/stds over pins."""
    con = connect(ws)
    pins = [r[0] for r in con.execute("SELECT pin_id FROM pins ORDER BY pin_id").fetchall()]
    users = [r[0] for r in con.execute("SELECT user_id FROM users ORDER BY user_id").fetchall()]
    interests = [r[0] for r in con.execute("SELECT interest_id FROM interests ORDER BY interest_id").fetchall()]

    def cat_vocab(table: str, col: str) -> Vocab:
        rows = con.execute(
            f"SELECT {col} FROM {table} WHERE {col} IS NOT NULL GROUP BY 1 HAVING count(*) >= ? ORDER BY 1", [min_count]
        ).fetchall()
        return Vocab([r[0] for r in rows])

    pin_cat = {c: cat_vocab("pins", c) for c in _columns(con, "pins", "cat_")}
    user_cat = {c: cat_vocab("users", c) for c in _columns(con, "users", "cat_")}
    pin_num = {}
    for c in _columns(con, "pins", "num_"):
        mean, std = con.execute(f"SELECT avg({c}), stddev_pop({c}) FROM pins").fetchone()
        pin_num[c] = (float(mean or 0.0), float(std or 1.0) or 1.0)
    emb = con.execute("SELECT max(len(embedding)) FROM pins").fetchone()[0]
    return FeatureState(Vocab(pins), Vocab(users), Vocab(interests), pin_cat, user_cat, pin_num, int(emb or 0))


def padded(lists: list[list[int]], width: int) -> np.ndarray:
    """Code lists -> (N, width) int64, the first `width` codes of each row, PAD after them."""
    out = np.full((len(lists), width), PAD, dtype=np.int64)
    for i, lst in enumerate(lists):
        n = min(len(lst), width)
        out[i, :n] = lst[:n]
    return out


@dataclass
class PinArrays:
    """Per-pin model inputs indexed by pin code (row 0 padding, row 1 OOV)."""

    cat: np.ndarray  # (P, C) int64
    num: np.ndarray  # (P, N) float32, standardised, 0 where missing
    emb: np.ndarray  # (P, E) float32, 0 where missing
    interests: list[list[int]]  # interest codes per pin


@dataclass
class UserArrays:
    cat: np.ndarray  # (U, Cu) int64
    followed: list[list[int]]  # followed interest codes per user
    followed_pad: np.ndarray  # (U, K) the first K of them, PAD-filled


def _rows(
    t: pa.Table, key: str, rows: Vocab, cats: dict[str, Vocab], list_col: str, interests: Vocab
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Row codes, categorical codes (rows, C) and interest-code lists, indexed by row code."""
    code = rows.encode(t[key])
    cat = np.zeros((len(rows), len(cats)), dtype=np.int64)
    for j, (c, v) in enumerate(cats.items()):
        cat[code, j] = v.encode(t[c])
    lists: list[list[int]] = [[] for _ in range(len(rows))]
    for c, lst in zip(code.tolist(), t[list_col].to_pylist()):
        lists[c] = interests.encode(lst).tolist() if lst else []
    return code, cat, lists


def pin_arrays(ws: Workspace, fs: FeatureState) -> PinArrays:
    con = connect(ws)
    cols = ["pin_id", "interests"] + list(fs.pin_cat) + list(fs.pin_num) + (["embedding"] if fs.emb_dim else [])
    t = con.sql(f"SELECT {', '.join(cols)} FROM pins").to_arrow_table()
    P = len(fs.pins)
    code, cat, interests = _rows(t, "pin_id", fs.pins, fs.pin_cat, "interests", fs.interests)
    num = np.zeros((P, len(fs.pin_num)), dtype=np.float32)
    for j, (c, (mean, std)) in enumerate(fs.pin_num.items()):
        x = t[c].to_numpy(zero_copy_only=False).astype(np.float64)
        num[code, j] = np.nan_to_num((x - mean) / std)
    emb = np.zeros((P, fs.emb_dim), dtype=np.float32)
    if fs.emb_dim:
        col = t["embedding"].combine_chunks()
        present = ~col.is_null().to_numpy(zero_copy_only=False)
        if present.any():
            flat = pc.list_flatten(col.filter(pa.array(present))).to_numpy(zero_copy_only=False)
            emb[code[present]] = flat.reshape(-1, fs.emb_dim)
    return PinArrays(cat, num, emb, interests)


def user_arrays(ws: Workspace, fs: FeatureState, max_interests: int) -> UserArrays:
    con = connect(ws)
    cols = ["user_id", "followed_interests"] + list(fs.user_cat)
    t = con.sql(f"SELECT {', '.join(cols)} FROM users").to_arrow_table()
    _, cat, followed = _rows(t, "user_id", fs.users, fs.user_cat, "followed_interests", fs.interests)
    return UserArrays(cat, followed, padded(followed, max_interests))
