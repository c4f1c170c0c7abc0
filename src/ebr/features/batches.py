"""Model inputs as tensors: pin fields by pin code, users as of a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ebr.features.age import NO_TIME, age_buckets
from ebr.features.examples import NO_EVENT, T_MAX, Histories
from ebr.features.state import PinArrays, UserArrays, padded


@dataclass
class PinInputs:
    cat: torch.Tensor
    num: torch.Tensor
    emb: torch.Tensor
    interests: torch.Tensor  # (P, K) interest codes, PAD-filled

    @classmethod
    def from_arrays(cls, p: PinArrays, max_interests: int) -> PinInputs:
        return cls(torch.from_numpy(p.cat), torch.from_numpy(p.num), torch.from_numpy(p.emb),
                   torch.from_numpy(padded(p.interests, max_interests)))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pin's (cat, num, emb, interests)."""
        return self.cat, self.num, self.emb, self.interests

    def take(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ids, *(x.index_select(0, ids) for x in (self.cat, self.num, self.emb, self.interests))


@dataclass
class UserBatch:
    user: torch.Tensor  # (B,)
    hist: torch.Tensor  # (B, L) pin codes, 0 = padding
    actions: torch.Tensor  # (B, L)
    cat: torch.Tensor  # (B, Cu)
    followed: torch.Tensor  # (B, K) followed interest codes, PAD-filled
    condition: torch.Tensor  # (B,) interest code, 0 = none (reserved for conditional retrieval)

    def rest(self) -> tuple[torch.Tensor, ...]:
        """The user tower's inputs after the history: (actions, cat, followed, condition, user)."""
        return self.actions, self.cat, self.followed, self.condition, self.user


def user_batch(users: np.ndarray, t: np.ndarray, hist: Histories, ua: UserArrays, L: int,
               condition: np.ndarray | None = None, back: np.ndarray | None = None,
               leave_out: np.ndarray | None = None, gap_as_of: int | None = None) -> UserBatch:
    """Users (codes) as of times t: history strictly before t (ending `back` events earlier, when
    given: Histories.at), features, followed interests. leave_out (n,): row i's history without
    the events on pin leave_out[i], the last L of the rest (one more event read in its place, so
    a row whose pin is among the user's last L sees L others, as evaluation sees L).
    gap_as_of (features.user_gap): one more categorical column, the bucket of the time from the
    history's most recent event to t (features/age.py's buckets; 0: no earlier event), where a row
    read at the end of the data (t = T_MAX) counts to gap_as_of (the bundle's time)."""
    if leave_out is None:
        pins, actions = hist.at(users, t, L, back)
    else:
        pins, actions = hist.at(users, t, L + 1, back)
        keep = pins != np.asarray(leave_out)[:, None]
        order = np.argsort(keep, axis=1, kind="stable")[:, 1:]  # left out first; the rest in order
        pins, actions = np.take_along_axis(pins, order, 1), np.take_along_axis(actions, order, 1)
        gone = ~np.take_along_axis(keep, order, 1)
        pins[gone], actions[gone] = 0, 0
    cond = np.zeros(len(users), dtype=np.int64) if condition is None else condition
    cat = ua.cat[users]
    if gap_as_of is not None:
        t = np.asarray(t, dtype=np.int64)
        last = hist.last_time(users, t, back)
        gap = age_buckets(np.where(last == NO_EVENT, NO_TIME, last), np.where(t == T_MAX, gap_as_of, t))
        cat = np.concatenate([cat, gap[:, None]], axis=1)
    return UserBatch(torch.from_numpy(np.asarray(users, dtype=np.int64)), torch.from_numpy(pins),
                     torch.from_numpy(actions), torch.from_numpy(cat),
                     torch.from_numpy(ua.followed_pad[users]), torch.from_numpy(cond))
