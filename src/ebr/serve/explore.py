"""`ebr explore`: what the explorer page (GET /explore) reads besides /v1/retrieve.

The page draws one user's stored history (tiles, newest first), then asks /v1/retrieve (the same
Retriever the service answers with, `explain` on) for the candidates and, in multi mode, the
clusters. This module only looks things up: the user list, a user's history with each pin's
interests and colour, and, for the synthetic world, the user's true latent interests read from
WORKSPACE/truth/users.parquet (diagnostics; no model ever reads them).

A tile's colour comes from the pin's embedding in the bundle (the pin tower's output, the vector
the index stores): a fixed random projection to three channels, so similar pins look alike.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebr.data.schema import ACTIONS
from ebr.features.state import FIRST_ID
from ebr.model.interests import valid_items
from ebr.serve.retriever import Retriever

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"explore.js": "text/javascript", "explore.css": "text/css"}  # the only files served besides the page


def page() -> str:
    return (STATIC / "explore.html").read_text()


def asset(name: str) -> tuple[str, str] | None:
    """(text, media type) of a shipped asset; None for any other name (no path is ever built from it)."""
    if name not in ASSETS:
        return None
    return (STATIC / name).read_text(), ASSETS[name]


_PALETTE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _palette(r: Retriever) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(projection (D, 3), centre (3,), spread (3,)) of a bundle's pin embeddings, computed once."""
    if r not in _PALETTE:
        emb = r.pin_emb.numpy()
        proj = np.random.default_rng(0).standard_normal((emb.shape[1], 3)).astype(np.float32)
        sample = emb[np.random.default_rng(1).choice(len(emb), min(len(emb), 20000), replace=False)] @ proj
        _PALETTE[r] = (proj, sample.mean(0), sample.std(0) + 1e-6)
    return _PALETTE[r]


def pin_colours(r: Retriever, codes: np.ndarray) -> list[str]:
    """'#rrggbb' per pin code from its embedding: a fixed random projection to three channels,
    centred and scaled over the bundle's pins (the same colours in every process)."""
    proj, centre, spread = _palette(r)
    x = 0.5 + 0.5 * np.tanh((r.pin_emb.numpy()[codes] @ proj - centre) / spread)
    rgb = (30 + 200 * x).astype(int)
    return [f"#{a:02x}{b:02x}{c:02x}" for a, b, c in rgb.tolist()]


def interest_names(r: Retriever, codes) -> list[str]:
    return [r.interest_ids[c] for c in codes if FIRST_ID <= c < len(r.interest_ids)]


def search_users(r: Retriever, q: str, limit: int = 50) -> list[str]:
    """Up to `limit` user ids containing q (case-insensitive), users with history first."""
    q = q.lower()
    warm, cold = [], []
    for code, uid in enumerate(r.fs.users.ids, start=FIRST_ID):
        if q in uid.lower():
            (warm if r.is_warm(code) else cold).append(uid)
            if len(warm) >= limit:
                break
    return (warm + cold)[:limit]


def user_view(r: Retriever, user_id: str, truth: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """The user's stored state as of the bundle: history tiles newest first (pin, action, interests,
    colour, whether it is clustered: hides are not), followed interests, and the latent interests
    when the world has them."""
    code = int(r.user_codes([user_id])[0])
    known = code >= FIRST_ID
    out: dict[str, Any] = {"user_id": user_id, "known": known, "history": [], "followed": [],
                           "modes": r.manifest["modes"], "version": r.version}
    if known:
        hist, actions, _, followed = (x[0] for x in r.stored_inputs(np.array([code])))
        keep = hist >= FIRST_ID
        h, a = hist[keep][::-1], actions[keep][::-1]
        valid = valid_items(torch.from_numpy(a.copy())).numpy()
        colours = pin_colours(r, h)
        out["history"] = [
            {"pin_id": r.pin_ids[p], "action": ACTIONS[act - 1] if 1 <= act <= len(ACTIONS) else "unknown",
             "interests": interest_names(r, r.pin_interests[p]), "colour": c, "valid": bool(v)}
            for p, act, c, v in zip(h.tolist(), a.tolist(), colours, valid.tolist())
        ]
        out["followed"] = interest_names(r, followed.tolist())
    if truth is not None and user_id in truth:
        out["truth"] = truth[user_id]
    return out


def colours_of(r: Retriever, pin_ids: list[str]) -> dict[str, dict]:
    """Colour and interests of pins by id (the page's candidate tiles); unknown ids are skipped."""
    codes = r.pin_codes(pin_ids)
    ok = codes >= FIRST_ID
    ids = [p for p, k in zip(pin_ids, ok.tolist()) if k]
    cols = pin_colours(r, codes[ok]) if ok.any() else []
    return {p: {"colour": c, "interests": interest_names(r, r.pin_interests[int(x)])}
            for p, c, x in zip(ids, cols, codes[ok].tolist())}


def load_truth(workspace: str | Path | None) -> dict[str, list[dict]] | None:
    """user id -> [{"interest", "weight"}] (weights at the end of the world) from a synthetic
    workspace's truth/users.parquet; None when there is none."""
    if workspace is None:
        return None
    path = Path(workspace) / "truth" / "users.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["user_id", "interests", "weights_end"]).to_pydict()
    return {u: sorted(({"interest": i, "weight": round(float(w), 4)} for i, w in zip(ints, ws)),
                      key=lambda x: -x["weight"])
            for u, ints, ws in zip(t["user_id"], t["interests"], t["weights_end"])}
