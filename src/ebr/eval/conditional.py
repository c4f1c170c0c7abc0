"""Conditional retrieval's counting rules (EVALUATION.md): filtered HR@K and Recall@K per (user,
interest), and the topic-match rate of the unfiltered top K.

Pairs come from the test part's targets (the warm users' targets of the main protocol): an
engagement's logged source interest when the data logs any (synthetic search and interest-feed
traffic), otherwise each interest of the target pin (ML-100K: its genres). A pair's targets are the
user's target pins under that interest. Each model answers each pair with the condition's list:

- `conditional`: the tower conditioned on the interest, searched among the interest's pins
  (filtered), and conditioned but unfiltered (topic match: the share of the top K carrying it);
- `two_tower`: the run's implicit (unconditioned) embedding with the same filter; its unfiltered
  top K is the user's plain list (topic match of a model that ignores the condition);
- `interest_popular`: the interest's popular pins (the token-based interest feed for one interest).

Long-tail interests: the bottom half of the pairs' interests by visible positive engagements on
pins carrying them, reported apart (`longtail_*`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ebr.data.splits import Part
from ebr.features.examples import Engagements, EvalSpec
from ebr.features.state import ACTION_CODE
from ebr.ranking import topk_masked


def condition_pairs(e: Engagements, spec: EvalSpec, pin_interests: Sequence[Sequence[int]],
                    positive_actions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], str]:
    """-> (index into spec.users per pair, interest code per pair, targets per pair, source), pairs
    sorted by (interest, user); source "logged" or "target_interests"."""
    pos = np.isin(e.action, [ACTION_CODE[a] for a in positive_actions]) & (e.part == Part.TEST)
    cond = e.conditions()
    logged = bool((pos & (cond > 0)).any())
    bounds = np.searchsorted(e.user, np.arange(int(e.user.max()) + 2 if len(e.user) else 1))
    pairs: dict[tuple[int, int], set[int]] = {}
    for i, (u, tgt) in enumerate(zip(spec.users.tolist(), spec.targets)):
        tset = set(np.asarray(tgt).tolist())
        lo, hi = bounds[u], bounds[u + 1]
        if logged:
            m = pos[lo:hi] & (cond[lo:hi] > 0)
            for p, c in zip(e.pin[lo:hi][m].tolist(), cond[lo:hi][m].tolist()):
                if p in tset:
                    pairs.setdefault((c, i), set()).add(p)
        else:
            for p in tset:
                for c in pin_interests[p]:
                    pairs.setdefault((c, i), set()).add(p)
    keys = sorted(pairs)
    return (np.array([i for _, i in keys], dtype=np.int64), np.array([c for c, _ in keys], dtype=np.int64),
            [np.array(sorted(pairs[k]), dtype=np.int64) for k in keys], "logged" if logged else "target_interests")


def _pair_metrics(top: np.ndarray, targets: list[np.ndarray], conds: np.ndarray, has: Callable[[np.ndarray, int],
                  np.ndarray], ks: Sequence[int], topic: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-pair arrays: filtered_hr@K, filtered_recall@K and (given the unfiltered top) topic_match@K."""
    out: dict[str, list[float]] = {}
    for j, (row, tgt) in enumerate(zip(top, targets)):
        hits = np.isin(row, tgt)
        for k in ks:
            out.setdefault(f"filtered_hr@{k}", []).append(float(hits[:k].any()))
            out.setdefault(f"filtered_recall@{k}", []).append(float(hits[:k].sum()) / len(tgt))
            if topic is not None:
                got = topic[j, :k]
                got = got[got >= 0]
                share = float(has(got, int(conds[j])).mean()) if len(got) else 0.0
                out.setdefault(f"topic_match@{k}", []).append(share)
    return {name: np.array(v) for name, v in out.items()}


def conditional_metrics(r, e: Engagements, visible: np.ndarray, spec: EvalSpec, plain_top: np.ndarray,
                        popularity: Callable[[np.ndarray], torch.Tensor], ks: Sequence[int],
                        positive_actions: Sequence[str], only: np.ndarray | None = None,
                        mode: str = "single") -> dict | None:
    """The conditional block of `ebr eval`'s JSON (None when the test part yields no pair). `r` is
    the Retriever; `plain_top` the run's unconditioned top max(ks) of each spec user; `only`
    restricts the candidates (a corpus)."""
    uidx, conds, targets, source = condition_pairs(e, spec, r.pin_interests, positive_actions)
    if len(uidx) == 0:
        return None
    K = max(ks)
    conditional = "conditional" in r.manifest["modes"]
    P = len(r.pin_ids)

    def has(pins: np.ndarray, c: int) -> np.ndarray:
        return np.isin(pins, r.interest_pins.get(c, np.zeros(0, dtype=np.int64)))

    names = (["conditional"] if conditional else []) + ["two_tower", "interest_popular"]
    tops = {n: np.full((len(uidx), K), -1, dtype=np.int64) for n in names}
    topic_c = np.full((len(uidx), K), -1, dtype=np.int64)
    for c in np.unique(conds).tolist():
        rows = np.flatnonzero(conds == c)
        users = spec.users[uidx[rows]]
        excl = [spec.exclude[i] for i in uidx[rows]]
        allowed = r.interest_allowed(c, only)
        cond = np.full(len(rows), c, dtype=np.int64)
        if conditional:
            tops["conditional"][rows] = r.retrieve_codes(users, K, exclude=excl, allowed=allowed, mode=mode,
                                                         merge="max", condition=cond)[1]
            topic_c[rows] = r.retrieve_codes(users, K, exclude=excl, allowed=only, mode=mode, merge="max",
                                             condition=cond)[1]
        tops["two_tower"][rows] = r.retrieve_codes(users, K, exclude=excl, allowed=allowed, mode=mode, merge="max")[1]
        mask = torch.zeros(P, dtype=torch.bool)
        mask[torch.from_numpy(allowed)] = True
        tops["interest_popular"][rows] = topk_masked(popularity(users), K, excl, mask)[1].numpy()
    # long tail: the bottom half of the pairs' interests by visible positive engagements
    pos = visible & np.isin(e.action, [ACTION_CODE[a] for a in positive_actions])
    per_pin = np.bincount(e.pin[pos], minlength=P)
    present = np.unique(conds)
    volume = np.array([per_pin[r.interest_pins.get(int(c), np.zeros(0, dtype=np.int64))].sum() for c in present])
    tail = set(present[np.argsort(volume, kind="stable")[: len(present) // 2]].tolist())
    in_tail = np.isin(conds, list(tail))
    results = []
    for name, top in tops.items():
        topic = topic_c if name == "conditional" else (plain_top[uidx] if name == "two_tower" else None)
        per = _pair_metrics(top, targets, conds, has, ks, topic)
        row = {"name": name, **{m: float(v.mean()) for m, v in per.items()}}
        row.update({f"longtail_{m}": float(v[in_tail].mean()) if in_tail.any() else float("nan")
                    for m, v in per.items() if m.startswith("filtered_")})
        results.append(row)
    return {"conditions_from": source, "n_pairs": int(len(uidx)), "n_longtail_pairs": int(in_tail.sum()),
            "n_interests": int(len(present)), "n_longtail_interests": len(tail), "results": results}
