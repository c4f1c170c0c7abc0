"""One contract suite for every ANN backend, run on indexes saved and loaded from disk the way
the Retriever loads them: filtered search and exclusions on 25k pins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ebr.index.backends import BACKENDS, AnnIndex, SearchDefaults, build_index, contains, members

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
def index(request, world, tmp_path_factory):
    """Built, saved, and loaded back as a bundle's loader does (a loaded index once lost its
    vectors, and with them the exact fallback, while a freshly built one kept them)."""
    emb, codes, _, _ = world
    d = tmp_path_factory.mktemp(request.param)
    build_index(request.param, emb, codes).save(d)
    return AnnIndex.from_bytes((d / "index.faiss").read_bytes(), np.load(d / "index_codes.npy"), request.param,
                               vectors=emb)


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


@pytest.mark.parametrize("n_left", [10, 3_000])
def test_answer_size_is_min_k_available_under_heavy_exclusion(index, world, n_left):
    """Excluding all but n_left pins: every row holds min(k, n_left) results, none excluded, and
    they equal exact search; excluded codes the index lacks (padding, unknown, past the last code)
    count for nothing. Mutations caught: filtering exclusions after an ANN search of k + n results
    without completing short rows (HNSW returned 6 of 10 pins left); counting exclusions without
    the `indexed` lookup (the unknown codes lower the count: short rows) or without its bounds."""
    emb, codes, q, _ = world
    rng = np.random.default_rng(1)
    left = np.sort(rng.choice(codes, n_left, replace=False))
    excluded = np.setdiff1d(codes, left)
    ex = [np.concatenate([excluded, [-1, 0, 1, N + 2, N + 500]])] * 8
    defaults = dataclasses.replace(SearchDefaults(), exact_below=0)  # through the index, however few are left
    for k in (5, 100):
        _, got = index.search(q[:8], k, defaults, exclude=ex)
        assert ((got >= 0).sum(1) == min(k, n_left)).all()
        assert np.isin(got[got >= 0], left).all(), "an excluded pin came back"
    _, got = index.search(q[:8], 100, SearchDefaults(), exclude=ex)
    _, want = build_index("exact", emb, left).search(q[:8], 100, SearchDefaults())
    if n_left < SearchDefaults().exact_below:
        assert np.array_equal(got, want), "below the threshold, answers must equal exact search"


def test_filtered_retriever_path_falls_back_to_exact(tiny_ws):
    """Through the Retriever, a selective filter is scored exactly: results equal exact search."""
    from ebr.config import RunConfig
    from ebr.index.bundle import build_bundle
    from ebr.serve.retriever import Retriever
    from ebr.train.loop import train

    train(tiny_ws, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [32]}), run="flt", progress=False)
    exact = Retriever(build_bundle(tiny_ws, "flt", "latest", backend="exact"))
    interest = exact.fs.interests.ids[3]
    code = int(exact.fs.interests.encode([interest])[0])
    users = [u for u in exact.fs.users.ids[:50] if exact.is_warm(int(exact.user_codes([u])[0]))][:5]
    for backend in ("hnsw", "ivfpq"):
        r = Retriever(build_bundle(tiny_ws, "flt", "latest", backend=backend))
        n_allowed = len(r.allowed_for_interests([interest]))
        for u in users:
            want = exact.retrieve(u, 1000, interests=[interest])
            res = r.retrieve(u, 1000, interests=[interest])
            assert res.pin_ids == want.pin_ids, f"{backend}: filtered answers differ from exact"
            engaged = len(
                np.intersect1d(r.engaged_pins(int(r.user_codes([u])[0])), r.allowed_for_interests([interest]))
            )
            assert len(res.pin_ids) == min(1000, n_allowed - engaged)
            assert all(code in r.pin_interests[r._pin_code[p]] for p in res.pin_ids)


def test_members_is_the_sorted_intersection():
    """members(x, pool) == np.intersect1d(x, pool) and contains(pool, x) == np.isin(x, pool) for
    unsorted x with repeats, values below, between and above the pool, and empty inputs. Mutations
    caught: dropping the equality check (values between pool entries kept), not clipping past the
    end, not deduplicating x."""
    rng = np.random.default_rng(0)
    pool = np.unique(rng.integers(0, 1000, 300))
    for x in (rng.integers(-50, 1100, 400), np.array([999, 999, 5, -1, 2000]), np.zeros(0, dtype=np.int64),
              pool[::-1].copy()):
        assert np.array_equal(members(x, pool), np.intersect1d(x, pool))
        assert np.array_equal(contains(pool, x), np.isin(x, pool))
    assert len(members(np.array([1, 2]), np.zeros(0, dtype=np.int64))) == 0
    assert not contains(np.zeros(0, dtype=np.int64), np.array([1, 2])).any()


def test_exclusions_are_counted_against_the_index_by_lookup(index, world):
    """The unfiltered search's `indexed` lookup gives members(x, codes): codes the index lacks
    (negative, padding, past the last one) drop out. Mutations caught: no lookup (every code kept),
    no lower bound (-1 reads the last code's entry)."""
    _, codes, _, _ = world
    x = np.array([-1, 0, 1, 2, 7, 7, 12_345, N + 1, N + 2, N + 500, 3])
    assert np.array_equal(index._indexed_members(x), members(x, codes))
