"""Multi-embedding retrieval end to end on the tiny world: training's association, the bundle, the
Retriever's merges, `ebr eval`'s two scores, and the HTTP service against `ebr retrieve` in
another process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from ebr.config import RunConfig
from ebr.eval.evaluate import evaluate
from ebr.features.batches import user_batch
from ebr.index.bundle import build_bundle, find_bundle
from ebr.model.interests import nearest_embedding
from ebr.ranking import max_over_embeddings, topk_masked
from ebr.serve.merge import quotas
from ebr.serve.retriever import Retriever
from ebr.train.loop import TrainState, prepare, train_step
from ebr.train.loss import inclusion_log_prob, sampled_softmax_logq
from tests.serve.test_service import Server

SETTINGS = {"train.epochs": 2, "train.batch_size": 256, "model.hidden": [64], "model.user_embeddings": "capsule"}


@pytest.fixture(scope="module")
def multi(multi_tiny):
    return multi_tiny


def test_training_trains_the_embedding_nearest_each_target(tiny_ws):
    """The step's loss is the logQ softmax on each row's best-scoring embedding. Mutations caught:
    train_step training embedding 0, or the mean of the embeddings, instead of the nearest one."""
    cfg = RunConfig.load(None, {**SETTINGS, "features.pin_age": False, "features.pin_counts": False})
    d = prepare(tiny_ws, cfg)
    s = TrainState.fresh(cfg, d.sizes)
    idx = np.arange(128)
    ex = d.examples
    log_q = inclusion_log_prob(np.bincount(ex.pin, minlength=d.sizes["n_pins"]), cfg.train.batch_size)
    ub = user_batch(ex.user[idx], ex.t[idx], d.hist, d.users, cfg.features.history_len, gap_as_of=d.gap_as_of)
    pos = torch.from_numpy(ex.pin[idx])
    with torch.no_grad():
        (q, active, _, _), v = s.model.embed_users_and_pins(ub.hist, ub.rest(), pos, d.pins.take)
        w = torch.from_numpy(ex.weight[idx])
        want = sampled_softmax_logq(nearest_embedding(q, active, v), v, pos, log_q[pos], 0.05, w)
        first = sampled_softmax_logq(q[:, 0], v, pos, log_q[pos], 0.05, w)
    assert active.sum(1).max() > 1 and abs(float(want) - float(first)) > 1e-3  # the test can tell them apart
    got = train_step(s, d, cfg, idx, log_q)
    assert got == pytest.approx(float(want), rel=1e-5)


def test_retriever_multi_mode(multi):
    """Mutations caught: sources not naming the embedding, quotas ignored, explain's history not the
    clustered items (or hides/padding included), the interest filter or exclusions skipped in
    multi mode, batch and single-request answers differing, two_tower not the max-over-embeddings
    top k."""
    ws, bundle = multi
    r = Retriever(bundle)
    assert r.manifest["modes"] == ["single", "multi"] and r.manifest["user_tower"]["embeddings"] == "capsule"
    users = [u for u in r.fs.users.ids if r.is_warm(int(r.user_codes([u])[0]))][:12]
    batch = r.retrieve_batch(users, 30, mode="multi")
    ks = []
    for u, b in zip(users, batch):
        one = r.retrieve(u, 30, mode="multi", explain=True)
        assert one.pin_ids == b.pin_ids and one.sources == b.sources
        K = len(one.embeddings)
        ks.append(K)
        assert len(one.pin_ids) == 30 == len(set(one.pin_ids))
        counts = Counter(one.sources)
        assert [counts[f"emb{j}"] for j in range(K)] == quotas(30, None, K).tolist()
        imp = [e["importance"] for e in one.embeddings]
        assert imp == sorted(imp, reverse=True)
        code = int(r.user_codes([u])[0])
        valid = r.hist[code][(r.hist[code] > 0) & (r.actions[code] != 5)]
        clustered = [p for e in one.embeddings for p in e["history"]]
        assert Counter(clustered) == Counter(r.pin_ids[c] for c in valid.tolist())
        assert [e["importance"] for e in one.embeddings] == [float(len(e["history"])) for e in one.embeddings]
        # single mode on a multi bundle: the first embedding alone
        first = r.search(r.embed_all(*r.stored_inputs(np.array([code])), users=np.array([code])).queries[:, 0], 30,
                         [r.engaged_pins(code)])[1][0]
        assert r.retrieve(u, 30).pin_ids == [r.pin_ids[c] for c in first if c >= 0]
    assert max(ks) > 1
    # filters and exclusions as in single mode
    interest = r.fs.interests.ids[0]
    res = r.retrieve(users[0], 20, mode="multi", interests=[interest], exclude=batch[0].pin_ids[:5])
    code_i = int(r.fs.interests.encode([interest])[0])
    assert res.pin_ids and all(code_i in r.pin_interests[int(c)] for c in r.pin_codes(res.pin_ids))
    assert not set(res.pin_ids) & set(batch[0].pin_ids[:5])
    # two_tower (max merge) = the dense top k of max-over-embeddings scores
    codes = r.user_codes(users)
    ex = [r.engaged_pins(int(c)) for c in codes]
    _, got = r.retrieve_codes(codes, 50, exclude=ex, mode="multi", merge="max")
    qs = r.embed_all(*r.stored_inputs(codes), users=codes)
    _, want = topk_masked(max_over_embeddings(qs.queries, qs.active, r.pin_emb), 50, ex, r.candidate)
    assert np.array_equal(got, want.numpy())


def test_eval_reports_max_and_served_lists(multi):
    ws, bundle = multi
    res = evaluate(ws, "multi", peers=("interest_popular",), progress=False)
    names = [x["name"] for x in res["results"]]
    assert names == ["two_tower", "two_tower_served", "interest_popular"]
    for x in res["results"]:
        assert 0.0 < x["diversity@100"] <= 1.0 and 0.0 < x["coverage@100"] <= 1.0
    a, b = res["results"][:2]
    assert a["recall@500"] != b["recall@500"] or a["recall@100"] != b["recall@100"]


def test_http_multi_equals_batch_retrieve_in_another_process(multi, tmp_path):
    """Parity across processes for mode multi (and auto = multi on such a bundle) over an HNSW
    bundle; explain returns the clusters. Mutations caught: the service ignoring mode (answering
    single), explain dropped, the ANN bundle's recall check not handling several embeddings."""
    ws, _ = multi
    bundle = build_bundle(ws, "multi", "temporal", backend="hnsw")
    assert Retriever(bundle).manifest["index"]["recall@100_vs_exact"] >= 0.9
    r = Retriever(bundle)
    users = r.fs.users.ids[:15] + ["nobody-at-all"]
    (tmp_path / "users.txt").write_text("\n".join(users))
    out = tmp_path / "batch.json"
    subprocess.run([sys.executable, "-m", "ebr.cli", "retrieve", "--bundle", str(bundle), "--users",
                    str(tmp_path / "users.txt"), "--k", "25", "--mode", "multi", "--json", str(out)],
                   check=True, capture_output=True)
    batch = json.loads(out.read_text())
    assert batch["mode"] == "multi"
    s = Server(bundle)
    try:
        assert s.post({"user_id": users[0], "k": 5}).status_code == 200
        ready = __import__("httpx").get(s.url + "/readyz", timeout=5).json()
        assert ready["modes"] == ["single", "multi"]
        for u in users:
            http = s.post({"user_id": u, "k": 25, "mode": "multi"}).json()
            assert [i["pin_id"] for i in http["items"]] == [i["pin_id"] for i in batch["users"][u]["items"]], u
            assert [i["source"] for i in http["items"]] == [i["source"] for i in batch["users"][u]["items"]]
        warm = next(u for u in users if r.is_warm(int(r.user_codes([u])[0])))
        auto = s.post({"user_id": warm, "k": 25, "mode": "auto", "explain": True}).json()
        assert auto["mode"] == "multi" and auto["embeddings"] and auto["items"][0]["source"] == "emb0"
        single = s.post({"user_id": warm, "k": 25}).json()
        assert "embeddings" not in single or single["embeddings"] is None
        assert [i["source"] for i in single["items"]] == ["single"] * 25
    finally:
        s.stop()
    assert find_bundle(ws, "multi", "temporal", backend="hnsw") == bundle
