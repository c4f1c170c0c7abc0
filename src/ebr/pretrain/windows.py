"""Which engagements ID pretraining may read, and which the retrieval model trains on (TECHNIQUES.md 4).

As at Pinterest, the IDs are pretrained on an older, longer window and the retrieval model trains
on a recent one: `data.id_pretrain_fraction` (0.7) splits a split's TRAINING part (never
validation, never test) into

- data with time: the older 70% of its time range, [start, id_cut), for `ebr pretrain-ids`, and the
  recent 30%, [id_cut, end), for a retrieval model with ID embeddings;
- data without time (a `given` split, pseudo-time = file order): a seeded partition of the training
  (user, pin) pairs, a random 70% of each user's pairs for pretraining and the rest for the
  retrieval model (`data.id_pretrain_seed`; every row of a pair falls on the same side, so a pair's
  label is never on both). `data.id_partition: file_order` takes each user's older 70% of pairs
  in pseudo-time (the file order) instead, as the default `auto` does where the lines are in
  engagement order (data.given_validation resolves last). A given split's validation pairs are
  drawn per training seed, so such a snapshot serves retrieval models of the seed it was
  pretrained with (`ebr pretrain-ids --seed`).

A window is described by an IdWindow (saved in each snapshot's manifest); `overlaps` says whether a
snapshot's window shares engagements with a retrieval model's training window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from ebr.data.splits import Part
from ebr.errors import EbrError
from ebr.features.examples import Engagements, given_validation

PRETRAIN, RETRIEVAL, WHOLE, CUSTOM = "pretrain", "retrieval", "train", "custom"


@dataclass(frozen=True)
class IdWindow:
    split: str
    kind: Literal["time", "partition"]
    side: str  # pretrain | retrieval | train (the whole training part) | custom (a START:END window)
    start: int = 0  # time windows: [start, end) in the engagements' time unit (microseconds)
    end: int = 0
    fraction: float = 0.7
    seed: int = 0  # the partition's seed (data.id_pretrain_seed)
    val_seed: int = 0  # given splits: the training seed that drew validation (it shapes the training part)
    rule: str = "random"  # partitions: random (seeded) or file_order (each user's older pairs pretrain)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IdWindow:
        return cls(**{k: d[k] for k in ("split", "kind", "side", "start", "end", "fraction", "seed",
                                                                 "val_seed", "rule") if k in d})

    def describe(self) -> str:
        if self.kind == "time":
            import datetime as dt

            f = dt.datetime.fromtimestamp
            return (f"{f(self.start / 1e6, dt.UTC):%Y-%m-%d %H:%M} to {f(self.end / 1e6, dt.UTC):%Y-%m-%d %H:%M} "
                    f"({self.side}, split {self.split})")
        return (f"{self.side} partition of split {self.split}'s training pairs ({self.rule}, fraction "
                f"{self.fraction}, seed {self.seed})")

    def overlaps(self, other: IdWindow) -> bool:
        """Whether the two windows can share an engagement."""
        if self.kind == "time" and other.kind == "time":
            return self.start < other.end and other.start < self.end
        if self.kind != other.kind or self.split != other.split:
            return True  # not comparable: treated as overlapping (the safe answer)
        if WHOLE in (self.side, other.side):
            return True
        return self.side == other.side or (self.fraction, self.seed, self.val_seed, self.rule) != (
            other.fraction, other.seed, other.val_seed, other.rule)


def windows(e: Engagements, split: str, fraction: float, seed: int, val_seed: int = 0,
            rule: str = "random") -> tuple[IdWindow, IdWindow]:
    """(pretraining window, retrieval training window) of a split's training part; `val_seed` is
    the training seed the engagements were loaded with (a given split's validation draw); `rule`
    the partition of data without time (data.id_partition; auto: file_order where the lines are in
    engagement order, e.given_validation last, else random)."""
    if rule == "auto":
        rule = "file_order" if e.given_validation == "last" else "random"
    if not 0 < fraction < 1:
        raise EbrError(f"data.id_pretrain_fraction must be in (0, 1), got {fraction}")
    train = e.part == Part.TRAIN
    if not train.any():
        raise EbrError(f"split {split!r} has no training engagements to pretrain IDs on")
    if not e.timed:
        return (IdWindow(split, "partition", PRETRAIN, fraction=fraction, seed=seed, val_seed=val_seed, rule=rule),
                IdWindow(split, "partition", RETRIEVAL, fraction=fraction, seed=seed, val_seed=val_seed, rule=rule))
    lo, hi = int(e.t[train].min()), int(e.t[train].max()) + 1
    cut = lo + int(round(fraction * (hi - lo)))
    return (IdWindow(split, "time", PRETRAIN, lo, cut, fraction, seed),
            IdWindow(split, "time", RETRIEVAL, cut, hi, fraction, seed))


def whole_window(e: Engagements, split: str, fraction: float, seed: int, val_seed: int = 0) -> IdWindow:
    """The split's whole training part (an overlapping snapshot, for ablations)."""
    train = e.part == Part.TRAIN
    if not e.timed:
        return IdWindow(split, "partition", WHOLE, fraction=fraction, seed=seed, val_seed=val_seed)
    return IdWindow(split, "time", WHOLE, int(e.t[train].min()), int(e.t[train].max()) + 1, fraction, seed)


def custom_window(e: Engagements, split: str, start: int, end: int) -> IdWindow:
    """A START:END window (data with time only), inside the split's training part."""
    if not e.timed:
        raise EbrError(f"split {split!r} has no timestamps: --window START:END needs time (omit it to pretrain "
                       "on the seeded partition of the training pairs)")
    train_end = int(e.t[e.part == Part.TRAIN].max()) + 1
    if end <= start:
        raise EbrError("--window START:END: END must be after START")
    if end > train_end:
        raise EbrError(f"--window ends after split {split!r}'s training part: pretraining on validation or test "
                       "engagements would leak them into the retrieval model; end it earlier or use another split")
    return IdWindow(split, "time", CUSTOM, start, end)


def pair_partition(e: Engagements, fraction: float, seed: int, rule: str = "random") -> np.ndarray:
    """(len(e),) bool: the engagements whose (user, pin) pair is on the pretraining side: a seeded
    random `fraction` of each user's training pairs (rule random), or each user's first `fraction`
    of them in pseudo-time, the file order (rule file_order); all rows of a pair on one side."""
    train = e.part == Part.TRAIN
    key = e.user.astype(np.int64) * (int(e.pin.max()) + 1 if len(e.pin) else 1) + e.pin
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    order = np.sort(first)  # pairs in engagement order (deterministic: by user, then time)
    rank_of = np.empty(len(uniq), dtype=np.int64)
    rank_of[np.argsort(first)] = np.arange(len(uniq))
    if rule == "file_order":
        idx = np.flatnonzero(train[order])
        u = e.user[order][idx]  # sorted: rows are by user, then (pseudo-)time
        rank = np.arange(len(u)) - np.searchsorted(u, u, side="left")
        n_u = np.bincount(u)[u] if len(u) else u
        side = np.zeros(len(order), dtype=bool)
        side[idx[rank < np.floor(n_u * fraction + 0.5)]] = True
    else:
        side = given_validation(e.user[order], train[order], seed=seed + 0x1D, fraction=fraction)
    return side[rank_of[inv]] & train


def mask(e: Engagements, w: IdWindow, parts: tuple[int, ...] = (Part.TRAIN,)) -> np.ndarray:
    """(len(e),) bool: the engagements of `parts` inside the window. A retrieval window read with
    parts (TRAIN, VALIDATION) (the refit) also takes validation engagements after its start."""
    inside = np.isin(e.part, parts)
    if w.kind == "time":
        end = np.iinfo(np.int64).max if (w.side == RETRIEVAL and Part.VALIDATION in parts) else w.end
        return inside & (e.t >= w.start) & (e.t < end)
    if w.side == WHOLE:
        return inside & (e.part == Part.TRAIN)
    pre = pair_partition(e, w.fraction, w.seed, w.rule)
    return inside & (pre if w.side == PRETRAIN else ~pre)
