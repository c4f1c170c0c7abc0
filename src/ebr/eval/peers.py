"""Peer baselines, scored in the same harness as the two-tower model: each is a function
user codes (B,) -> scores (B, P) over pin codes.

- popularity: time-decayed (14-day half-life) positive engagements as of the cut;
- interest_popular: the token-based "interest feed": popularity within the user's interests,
  weighted by the interest's share of the user's training engagements (followed interests get a
  prior share), so a pin scores pop(p) * max over its interests of the user's weight;
- als: implicit's ALS on the training user x pin matrix (confidence = summed action weights).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from ebr.features.examples import T_MAX, Engagements
from ebr.features.state import ACTION_CODE, UserArrays
from ebr.index.bundle import decayed_popularity

Scorer = Callable[[np.ndarray], torch.Tensor]
POS = np.array([ACTION_CODE[a] for a in ("closeup", "click", "save")])


def popularity(e: Engagements, visible: np.ndarray, n_pins: int) -> Scorer:
    pop = torch.from_numpy(decayed_popularity(e, T_MAX, visible=visible, n_pins=n_pins)).float()
    return lambda codes: pop.expand(len(codes), -1)


def interest_popular(e: Engagements, visible: np.ndarray, n_pins: int, pin_interests: list[list[int]],
                     users: UserArrays, n_interests: int, follow_prior: float = 0.2) -> Scorer:
    pop = decayed_popularity(e, T_MAX, visible=visible, n_pins=n_pins)
    m = visible & np.isin(e.action, POS)
    # user x interest engagement counts
    rows, cols = [], []
    for u, p in zip(e.user[m].tolist(), e.pin[m].tolist()):
        for i in pin_interests[p]:
            rows.append(u)
            cols.append(i)
    n_users = len(users.followed)
    ui = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_users, n_interests)).toarray()
    ui = ui / np.maximum(ui.sum(1, keepdims=True), 1)
    for u, f in enumerate(users.followed):
        for i in f:
            ui[u, i] += follow_prior / max(len(f), 1)
    # each pin's interests, padded with a column that always weighs 0
    width = max((len(x) for x in pin_interests), default=0) or 1
    pad = np.full((n_pins, width), n_interests, dtype=np.int64)
    for p, ints in enumerate(pin_interests):
        pad[p, : len(ints)] = ints
    pad_t = torch.from_numpy(pad)
    ui_t = torch.cat([torch.from_numpy(ui).float(), torch.zeros(n_users, 1)], dim=1)
    pop_t = torch.from_numpy(pop).float()

    def score(codes: np.ndarray) -> torch.Tensor:
        w = ui_t[torch.from_numpy(codes)]  # (B, I + 1)
        best = w[:, pad_t].amax(-1)  # (B, P): the user's weight of the pin's best interest
        return best * pop_t[None, :] + 1e-6 * pop_t[None, :]  # popularity breaks ties outside interests

    return score


def als(e: Engagements, visible: np.ndarray, n_users: int, n_pins: int, weights: dict[str, float],
        factors: int = 64, iterations: int = 15, regularization: float = 0.05, alpha: float = 10.0,
        seed: int = 0, progress: bool = False) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    w = np.zeros(8)
    for a, x in weights.items():
        w[ACTION_CODE[a]] = x
    m = visible & (w[e.action] > 0)
    mat = sp.csr_matrix((w[e.action[m]] * e.weight[m] * alpha, (e.user[m], e.pin[m])), shape=(n_users, n_pins),
                        dtype=np.float32)
    mat.sum_duplicates()
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads would fight them
        model = AlternatingLeastSquares(factors=factors, iterations=iterations, regularization=regularization,
                                        random_state=seed, num_threads=0)
        model.fit(mat, show_progress=progress)
    U = torch.from_numpy(np.asarray(model.user_factors, dtype=np.float32))
    V = torch.from_numpy(np.asarray(model.item_factors, dtype=np.float32))
    return lambda codes: U[torch.from_numpy(codes)] @ V.T
