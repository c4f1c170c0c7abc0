"""The serving fast path (issue #14): the traced user tower answers as the exported one, a tower
that TorchScript traces wrongly is not used, and /v1/retrieve's two ways in (the fast path for JSON
bodies, FastAPI's route for the rest) answer alike."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from ebr.serve.app import _encode
from ebr.serve.retriever import TRACE_MAX_NODES, Retriever
from tests.serve.test_service import Server, bundles  # noqa: F401  (the module's bundles fixture)


@pytest.mark.parametrize("which", ["multi_tiny", "cond_tiny"])
def test_traced_tower_answers_equal_the_exported_tower(which, request):
    """Every embedding, importance and assignment of one user, and the answers of every mode the
    bundle serves, equal the exported module's, bitwise, and a request runs the traced tower.
    Mutations caught: the traced tower fed its inputs in another order (followed and categorical
    swapped: a trace of the wrong call); embed_all never calling it."""
    _, bundle = request.getfixturevalue(which)
    r = Retriever(bundle)
    assert r.tower_one is not None, "the load kept no traced tower"
    traced_tower, calls = r.tower_one, []
    r.tower_one = lambda *x: calls.append(len(x[0])) or traced_tower(*x)
    r.retrieve(next(u for u in r.fs.users.ids if r.is_warm(int(r.user_codes([u])[0]))), 10)
    assert calls == [1], "a one-user request did not run the traced tower"
    r.tower_one = traced_tower
    users = r.fs.users.ids[:40] + ["nobody-at-all"]
    interest = [i for i in r.fs.interests.ids if len(r.interest_pins.get(int(r.fs.interests.encode([i])[0]), []))][0]
    modes = r.manifest["modes"]

    def answers():
        out = []
        for u in users:
            code = r.user_codes([u])
            out.append(tuple(x.clone() for x in r.embed_all(*r.stored_inputs(code), users=code)))
            for m in modes:
                res = r.retrieve(u, 30, mode=m, interests=[interest] if m == "conditional" else None)
                out.append((res.pin_ids, res.scores, res.sources))
        return out

    traced = answers()
    r.tower_one = None
    exported = answers()
    for a, b in zip(traced, exported):
        if isinstance(a[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), "the traced tower's outputs differ"
        else:
            assert a == b, "an answer differs with the traced tower"


class _Branchy(torch.nn.Module):
    """A tower with Python control flow on values: a trace keeps the branch of its example."""

    def forward(self, hist, actions, cat, followed, condition, user):
        x = torch.nn.functional.normalize(hist.sum(1)[:, :8] + 1e-3, dim=-1)
        return x if bool((actions > 0).any()) else -x


def test_a_tower_the_trace_gets_wrong_is_not_used(multi_tiny):
    """The check at load compares the trace with the module on stored users and the no-history
    row: a value-dependent branch differs between them, so no traced tower is kept. Mutation
    caught: keeping the trace without the comparison."""
    _, bundle = multi_tiny
    r = Retriever(bundle)
    r.tower = _Branchy()
    assert r._trace_for_one() is None


def test_a_tower_graph_above_the_node_cap_is_not_traced(multi_tiny):
    """A crafted bundle's very long graph (a 16,000-node chain crashed the process inside
    TorchScript) serves untraced. Mutation caught: tracing whatever the graph's size."""
    _, bundle = multi_tiny
    r = Retriever(bundle)

    class Chain(torch.nn.Module):
        def forward(self, hist, actions, cat, followed, condition, user):
            x = torch.nn.functional.normalize(hist.sum(1)[:, :8] + 1e-3, dim=-1)
            for _ in range(TRACE_MAX_NODES):
                x = x * 1.0
            return x

    r.tower = torch.fx.symbolic_trace(Chain())
    assert len(r.tower.graph.nodes) > TRACE_MAX_NODES
    assert r._trace_for_one() is None


def test_responses_encode_strings_orjson_refuses():
    """An id with a lone surrogate (a bundle's string) is escaped as json.dumps did, not a 500.
    Mutation caught: orjson without the fallback (it raises)."""
    out = {"items": [{"pin_id": "p\ud800", "score": 0.5, "source": "interest:\udfff"}], "version": "v"}
    assert json.loads(_encode(out)) == out
    assert json.loads(_encode({"a": [1, 2.5]})) == {"a": [1, 2.5]}


def test_both_ways_into_retrieve_answer_alike(bundles):  # noqa: F811
    """An application/json body takes the fast path (pydantic on the bytes); another JSON type
    (application/*+json) takes FastAPI's route: same answer, same 422. A text/plain body, or one
    without a content type, is FastAPI's (a 422: not declared JSON), never parsed as JSON.
    Mutations caught: the fast path taking any content type, or none (its 422 wording shows which
    way answered); the route not answering (the fast path's `answer` not shared)."""
    _, hnsw, _ = bundles
    s = Server(hnsw)
    try:
        r = Retriever(hnsw)
        user = [u for u in r.fs.users.ids if r.is_warm(int(r.user_codes([u])[0]))][0]
        url = s.url + "/v1/retrieve"

        def post(body: bytes, ctype: str | None):
            return httpx.post(url, content=body, headers={"content-type": ctype} if ctype else {}, timeout=10)

        ok = f'{{"user_id": "{user}", "k": 25}}'.encode()
        fast = post(ok, "application/json")
        assert fast.status_code == 200 and len(fast.json()["items"]) == 25
        route = "application/vnd.ebr+json"
        for ctype in ("application/json; charset=utf-8", route):
            other = post(ok, ctype)
            assert other.status_code == 200 and other.json() == fast.json(), ctype
        bad = f'{{"user_id": "{user}", "k": 0}}'.encode()
        assert post(bad, route).status_code == 422
        assert post(bad, "application/json").json() == post(bad, route).json()
        for ctype in ("text/plain", None):
            assert post(ok, ctype).status_code == 422, ctype
        # which way answered: pydantic's JSON mode words a non-object body differently
        assert "Input should be an object" in post(b"[1, 2]", "application/json").text
        assert "valid dictionary" in post(b"[1, 2]", route).text
        assert np.isfinite([i["score"] for i in fast.json()["items"]]).all()
    finally:
        s.stop()
