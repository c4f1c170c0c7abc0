"""One contract suite for every ANN backend: filtered search on 25k pins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ebr.index.backends import BACKENDS, SearchDefaults, build_index

N, D, N_INTERESTS = 25_000, 32, 40


@pytest.fixture(scope="module")
def world():
    """Clustered unit vectors (an embedding space has structure; random vectors are the worst case),
    each pin with 1-2 interests, and queries near the clusters."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(N_INTERESTS, D))
    primary = rng.integers(0, N_INTERESTS, N)
    second = np.where(rng.random(N) < 0.4, rng.integers(0, N_INTERESTS, N), -1)
    x = centres[primary] + 0.9 * rng.normal(size=(N, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = np.zeros((N + 2, D), dtype=np.float32)
    emb[2:] = x
    codes = np.arange(2, N + 2)
    q = centres[rng.integers(0, N_INTERESTS, 64)] + 0.9 * rng.normal(size=(64, D))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    has = {i: codes[(primary == i) | (second == i)] for i in range(N_INTERESTS)}
    return emb, codes, q, has


@pytest.fixture(scope="module", params=BACKENDS)
def index(request, world):
    emb, codes, _, _ = world
    return build_index(request.param, emb, codes)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max((b >= 0).sum(), 1) for a, b in zip(got, want)]))


def test_unfiltered_recall(index, world):
    emb, codes, q, _ = world
    exact = build_index("exact", emb, codes)
    _, want = exact.search(q, 100, SearchDefaults())
    _, got = index.search(q, 100, SearchDefaults())
    assert _recall(got, want) >= 0.95


@pytest.mark.parametrize("interests, fallback", [((0,), True), ((7,), True), (tuple(range(20)), False)])
def test_filtered_search_contract(index, world, interests, fallback):
    """Default settings: a selective filter (one interest, ~4% of pins) is scored exactly; a broad
    one (20 interests, ~60% of pins) goes through the index with a selector."""
    emb, codes, q, has = world
    allowed = np.unique(np.concatenate([has[i] for i in interests]))
    defaults = SearchDefaults() if fallback else dataclasses.replace(SearchDefaults(), exact_below=0)
    exact = build_index("exact", emb, codes)
    for k in (100, len(allowed) + 10) if fallback else (100,):  # an ANN search cannot return a whole 60% set
        _, got = index.search(q, k, defaults, allowed)
        _, want = exact.search(q, k, defaults, allowed)
        assert np.isin(got[got >= 0], allowed).all(), "a result outside the filter"
        assert ((got >= 0).sum(1) == min(k, len(allowed))).all(), "answer size != min(k, pins with the interest)"
        assert _recall(got[:, :100], want[:, :100]) >= 0.95


def test_filtered_retriever_path_falls_back_to_exact(tiny_ws):
    """Through the Retriever, a selective filter is scored exactly: results equal exact search."""
    from ebr.config import RunConfig
    from ebr.index.bundle import build_bundle
    from ebr.serve.retriever import Retriever
    from ebr.train.loop import train

    train(tiny_ws, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [32]}), run="flt", progress=False)
    r = Retriever(build_bundle(tiny_ws, "flt", "latest", backend="hnsw"))
    interest = r.fs.interests.ids[3]
    users = [u for u in r.fs.users.ids[:50] if r.is_warm(int(r.user_codes([u])[0]))][:5]
    for u in users:
        res = r.retrieve(u, 30, interests=[interest])
        code = int(r.fs.interests.encode([interest])[0])
        assert res.pin_ids and all(code in r.pin_interests[r._pin_code[p]] for p in res.pin_ids)
