"""Train -> bundle -> Retriever -> eval on the tiny world, with the contracts between them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ebr.cli import main
from ebr.config import RunConfig
from ebr.eval.evaluate import evaluate
from ebr.index.bundle import build_bundle, find_bundle
from ebr.index.verify import BundleError
from ebr.serve.retriever import Retriever
from ebr.train.loop import train
from ebr.workspace import read_json, write_json


@pytest.fixture(scope="module")
def trained(tiny_ws):
    cfg = RunConfig.load(None, {"train.epochs": 3, "train.batch_size": 256, "model.hidden": [64]})
    train(tiny_ws, cfg, run="e2e", progress=False)
    return tiny_ws


def test_eval_json_and_peers(trained, tmp_path):
    res = evaluate(trained, "e2e", peers=("popularity", "interest_popular", "als"), progress=False)
    assert res["protocol"] == "temporal" and res["n_users"] > 50
    names = [r["name"] for r in res["results"]]
    assert names == ["two_tower", "popularity", "interest_popular", "als"]
    for r in res["results"]:
        for k in (20, 50, 100, 500):
            for m in ("recall", "ndcg", "hr", "coverage"):
                assert 0.0 <= r[f"{m}@{k}"] <= 1.0
        assert r["recall@20"] <= r["recall@100"] <= r["recall@500"]
    tt = res["results"][0]
    assert tt["recall@100"] > res["results"][1]["recall@100"], "a trained model beats global popularity"
    # the bundle is reused by a second evaluation of the same checkpoint
    bundle = find_bundle(trained, "e2e", "temporal")
    assert bundle is not None and res["bundle"] == bundle.name


def test_retriever_batch_equals_single_requests(trained):
    r = Retriever(find_bundle(trained, "e2e", "temporal") or build_bundle(trained, "e2e", "temporal"))
    users = [u for u in r.fs.users.ids[:40] if r.is_warm(int(r.user_codes([u])[0]))][:10]
    codes = r.user_codes(users)
    scores, top = r.retrieve_codes(codes, 25)
    for i, u in enumerate(users):
        one = r.retrieve(u, 25)
        assert one.pin_ids == [r.pin_ids[c] for c in top[i]]
        assert np.allclose(one.scores, scores[i], atol=1e-5)
        engaged = set(r.pin_ids[c] for c in r.engaged_pins(int(codes[i])))
        assert not engaged & set(one.pin_ids), "engaged pins are excluded by default"
    # request-time history + features for an unknown user = the stored state of a known user, but
    # for the time since the last engagement (features.user_gap), which a request cannot carry: an
    # unknown user's history reads as ending now (the known user's stored gap is set to that here)
    from ebr.data.schema import ACTIONS
    from ebr.serve.retriever import JUST_NOW

    c0 = int(codes[0])
    assert r.manifest["user_tower"]["user_gap"], "the temporal tiny world reads gaps (features.user_gap auto)"
    r.cat[c0, -1] = JUST_NOW
    hist = [{"pin_id": r.pin_ids[p], "action": ACTIONS[a - 1]} for p, a in zip(r.hist[c0], r.actions[c0]) if p > 0]
    feats = {col: v.decode([r.cat[c0][j]])[0] for j, (col, v) in enumerate(r.fs.user_cat.items())}
    followed = r.fs.interests.decode(r.followed[c0][r.followed[c0] > 0])
    stored = r.retrieve(users[0], 10, history=hist, exclude_engaged=False)
    given = r.retrieve("somebody-new", 10, history=hist, features=feats, followed=followed)
    assert given.pin_ids == stored.pin_ids and not given.cold_start
    assert given.pin_ids != r.retrieve("somebody-new", 10, history=hist[:3], features=feats,
                                       followed=followed).pin_ids
    cold = r.retrieve("somebody-new", 10)
    assert cold.cold_start and cold.sources == ["popular"] * 10
    # a new user who only follows interests gets the tower, not the popular list (mutation caught:
    # the request's followed interests ignored, or such a user sent to the cold-start path)
    a, b = (r.retrieve("somebody-new", 10, followed=[i]) for i in r.fs.interests.ids[:2])
    assert a.sources == ["features"] * 10 and a.cold_start and a.pin_ids != b.pin_ids


def test_bundle_refuses_mismatch_and_corruption(trained, tmp_path):
    src = find_bundle(trained, "e2e", "temporal") or build_bundle(trained, "e2e", "temporal")
    bad = tmp_path / "b1"
    shutil.copytree(src, bad)
    m = read_json(bad / "manifest.json")
    m["index"]["model_version"] = "something-else"
    write_json(bad / "manifest.json", m)
    with pytest.raises(BundleError, match="model version"):
        Retriever(bad)
    bad2 = tmp_path / "b2"
    shutil.copytree(src, bad2)
    with open(bad2 / "pin_embeddings.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="pin_embeddings.npy: checksum mismatch"):
        Retriever(bad2)


def test_checkpoint_and_bundle_load_without_train_package(trained):
    bundle = find_bundle(trained, "e2e", "temporal") or build_bundle(trained, "e2e", "temporal")
    code = (
        "import sys\n"
        "from ebr.index.bundle import load_checkpoint\n"
        "from ebr.serve.retriever import Retriever\n"
        f"m, ck = load_checkpoint(__import__('pathlib').Path({str(trained.run_dir('e2e') / 'checkpoints' / 'best.pt')!r}))\n"  # noqa: E501
        f"r = Retriever({str(bundle)!r})\n"
        "assert not any(k.startswith('ebr.train') for k in sys.modules), [k for k in sys.modules if 'ebr.train' in k]\n"
        "print('ok', ck['feature_state']['pins'][:1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_cli_retrieve_and_eval(trained, tmp_path, capsys):
    ws = str(trained.root)
    bundle = find_bundle(trained, "e2e", "temporal") or build_bundle(trained, "e2e", "temporal")
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\nnobody\n")
    out = tmp_path / "cands.json"
    assert (
        main(["retrieve", "-w", ws, "--bundle", str(bundle), "--users", str(users), "--k", "7", "--json", str(out)])
        == 0
    )
    got = json.loads(out.read_text())
    assert set(got["users"]) == {"u1", "u2", "nobody"} and got["users"]["nobody"]["cold_start"]
    assert all(len(v["items"]) == 7 for v in got["users"].values())
    ej = tmp_path / "eval.json"
    assert main(["eval", "-w", ws, "--run", "e2e", "--peers", "popularity", "--json", str(ej)]) == 0
    res = json.loads(ej.read_text())
    assert [r["name"] for r in res["results"]] == ["two_tower", "popularity"]
    assert (trained.report_dir("latest") / "recall_at_k.png").exists()
    assert (trained.report_dir("latest") / "training.png").exists()


def test_request_history_is_read_as_training_reads_it(trained):
    """A request carrying the stored history gets exactly the stored-state answer, and appending
    impressions or unknown pins changes nothing. Mutations caught: impressions pooled, unknown
    pins pooled as out-of-vocabulary clicks, truncation to L before dropping them."""
    from ebr.data.schema import ACTIONS

    r = Retriever(find_bundle(trained, "e2e", "temporal") or build_bundle(trained, "e2e", "temporal"))
    code = int(np.argmax((r.hist > 0).sum(1)))  # the longest stored history
    user = r.fs.users.ids[code - 2]
    hist = [{"pin_id": r.pin_ids[p], "action": ACTIONS[a - 1]} for p, a in zip(r.hist[code], r.actions[code]) if p > 0]
    assert len(hist) == r.L, "the test needs a full history"
    stored = r.retrieve(user, 30)
    assert r.retrieve(user, 30, history=hist).pin_ids == stored.pin_ids
    noisy = (
        hist + [{"pin_id": r.pin_ids[5 + i], "action": "impression"} for i in range(5)] + ["no-such-pin", "nor-this"]
    )
    again = r.retrieve(user, 30, history=noisy)
    assert again.pin_ids == stored.pin_ids and np.allclose(again.scores, stored.scores, atol=1e-6)


def test_eval_of_a_served_ann_bundle_and_leak_refusal(trained, capsys):
    """`ebr eval --bundle`: an HNSW bundle of the split is measured next to exact (same users and
    targets); a bundle that sees the test part is refused. Also the
    share of targets on pins that did not exist yet is reported. Mutations caught: eval ignoring
    --bundle, or accepting a bundle built on all data."""
    from ebr.errors import EbrError

    exact = evaluate(trained, "e2e", peers=(), progress=False)
    hnsw = build_bundle(trained, "e2e", "temporal", backend="hnsw")
    got = evaluate(trained, "e2e", peers=(), progress=False, bundle=hnsw)
    assert got["bundle"] == hnsw.name and got["backend"] == "hnsw" and exact["backend"] == "exact"
    assert got["n_users"] == exact["n_users"]
    assert 0.0 < exact["unreachable_target_share"] < 1.0
    latest = build_bundle(trained, "e2e", "latest", backend="hnsw")
    with pytest.raises(EbrError, match="can see split 'temporal'"):
        evaluate(trained, "e2e", peers=(), progress=False, bundle=latest)
    assert main(["eval", "--workspace", str(trained.root), "--run", "e2e", "--bundle", str(latest), "--peers", ""]) == 2
    assert "can see split" in capsys.readouterr().err


def test_followed_interests_need_a_tower_that_reads_them(tiny_ws):
    """A model trained without interest features ignores followed interests: a new user who only
    follows interests gets the popular list, not a tower embedding of nothing. Mutation caught:
    the Retriever applying a request's (or the stored) followed interests whatever the tower reads."""
    from ebr.config import RunConfig
    from ebr.train.loop import train

    cfg = RunConfig.load(None, {"train.max_steps": 2, "train.epochs": 1, "model.hidden": [16], "train.refit": False,
                                "features.interest_features": False})
    train(tiny_ws, cfg, run="no-interests", progress=False)
    r = Retriever(build_bundle(tiny_ws, "no-interests"))
    assert r.manifest["user_tower"]["followed_interests"] is False and not r.followed.any()
    res = r.retrieve("somebody-new", 10, followed=r.fs.interests.ids[:2])
    assert res.cold_start and res.sources == ["popular"] * 10
