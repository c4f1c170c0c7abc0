"""An ids-only dataset (adjacency lists, no time) through train -> eval, and the sampled protocol."""

from __future__ import annotations

import numpy as np
import torch

from ebr.config import RunConfig
from ebr.data.importers import import_adjacency
from ebr.eval.evaluate import evaluate
from ebr.train.loop import train
from ebr.workspace import Workspace


def test_ids_only_adjacency_given_protocol_and_sampled_candidates(tmp_path):
    rng = np.random.default_rng(0)
    # 200 users in 4 communities; each user likes items of their community (ids only, no features)
    lines_tr, lines_te, cands = [], [], []
    for u in range(200):
        c = u % 4
        items = rng.choice(np.arange(c * 50, c * 50 + 50), 12, replace=False)
        lines_tr.append(" ".join(map(str, [u, *items[:10]])))
        lines_te.append(" ".join(map(str, [u, *items[10:]])))
        others = [i for i in rng.choice(200, 30, replace=False) if i not in items][:20]
        cands.append(" ".join(map(str, [u, items[10], *others])))
    (tmp_path / "train.txt").write_text("\n".join(lines_tr))
    (tmp_path / "test.txt").write_text("\n".join(lines_te))
    (tmp_path / "cands.txt").write_text("\n".join(cands))
    ws = Workspace.at(tmp_path / "ws")
    import_adjacency(ws, tmp_path / "train.txt", tmp_path / "test.txt")
    cfg = RunConfig.load(None, {"train.epochs": 15, "train.batch_size": 128, "train.patience": 15,
                                "model.hidden": [64], "train.lr": 0.005, "train.threads": 1})
    threads = torch.get_num_threads()
    try:  # single-threaded: less run-to-run variation (0.46-0.55 NDCG@20 seen across runs)
        train(ws, cfg, run="ids", progress=False)
    finally:
        torch.set_num_threads(threads)
    res = evaluate(ws, "ids", peers=("popularity", "als"), progress=False)
    assert res["protocol"] == "given" and res["n_users"] == 200
    tt, pop = res["results"][0], res["results"][1]
    assert tt["name"] == "two_tower" and tt["recall@20"] > 2 * pop["recall@20"], res["results"]
    sampled = evaluate(ws, "ids", peers=("popularity",), candidates=tmp_path / "cands.txt", progress=False)
    assert sampled["protocol"] == "given+sampled" and sampled["n_users"] == 200
    s_tt = sampled["results"][0]
    # 21 candidates: a random ranker has NDCG@20 of about 0.33
    assert s_tt["ndcg@20"] > 0.42 and s_tt["ndcg@20"] > sampled["results"][1]["ndcg@20"] + 0.04, sampled["results"]


def test_sampled_protocol_counts_ties_at_the_mid_rank():
    """A constant scorer ranks the target in the middle of its 21 candidates (mid-rank 10): HR@1 = 0,
    HR@10 = 0, HR@11 = 1. Mutation caught: counting only strictly higher candidates (HR@1 = 1.0)."""
    from ebr.eval.evaluate import _sampled

    cands = [(u, np.arange(21)) for u in range(5)]
    res = _sampled(lambda users: torch.zeros(len(users), 30), cands, [1, 10, 11])
    assert res["hr@1"] == 0.0 and res["hr@10"] == 0.0 and res["hr@11"] == 1.0
    assert abs(res["ndcg@11"] - 1 / np.log2(12)) < 1e-12
    scores = torch.zeros(1, 30)
    scores[0, 0] = 1.0  # a strictly best target is rank 0 whatever the ties below it
    assert _sampled(lambda users: scores.expand(len(users), 30), cands, [1])["hr@1"] == 1.0
