"""Pretrained ID embeddings (TECHNIQUES.md 4): windows that never share an engagement, contrastive
pretraining that learns, on one process and on two (torchrun, gloo) alike, a snapshot registry that
refuses overlap and tampering, and a retrieval model that freezes, trains on the recent window and
serves its IDs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.data.splits import Part, load_split
from ebr.errors import EbrError
from ebr.features.examples import load_engagements, positive_examples
from ebr.features.state import FIRST_ID, build_feature_state
from ebr.pretrain import snapshots
from ebr.pretrain.ids import pretrain_ids
from ebr.pretrain.windows import mask, whole_window, windows
from tests.data.test_given_split import _adjacency

PRE = {"pretrain.epochs": 20, "pretrain.batch_size": 256, "pretrain.dim": 16}


@pytest.fixture(scope="module")
def snap(tiny_ws):
    """One snapshot of the tiny world's default (older) window, pretrained in this process."""
    return tiny_ws, pretrain_ids(tiny_ws, RunConfig.load(None, PRE), name="t-one", progress=False)


def _engagements(ws, seed: int = 0):
    fs = build_feature_state(ws)
    return fs, load_engagements(ws, fs, load_split(ws, None), seed=seed)


def test_time_windows_split_the_training_part(tiny_ws):
    """The pretraining window is the older 70% of the training part's time range, the retrieval
    window the rest: no engagement in both, nothing of validation or test in either (the refit's
    retrieval window adds validation, never test). Mutations caught: the retrieval window starting
    at the training part's start (overlap); a mask that ignores the split's parts (pretraining reads
    validation and test); windows() not checking which side a snapshot is on (whole overlaps)."""
    _, e = _engagements(tiny_ws)
    pre, ret = windows(e, "temporal", 0.7, 0)
    mp, mr = mask(e, pre), mask(e, ret)
    train = e.part == Part.TRAIN
    assert mp.any() and mr.any() and not (mp & mr).any()
    assert ((mp | mr) == train).all()
    assert e.t[mp].max() < e.t[mr].min()
    assert abs((pre.end - pre.start) / (ret.end - pre.start) - 0.7) < 1e-6
    refit = mask(e, ret, (Part.TRAIN, Part.VALIDATION))
    assert (refit & (e.part == Part.VALIDATION)).any() and not (refit & (e.part == Part.TEST)).any()
    assert not pre.overlaps(ret) and not ret.overlaps(pre)
    assert whole_window(e, "temporal", 0.7, 0).overlaps(ret)


def test_given_split_partitions_each_users_pairs(tmp_path):
    """Without time, pretraining and the retrieval model get a seeded partition of the training
    pairs: disjoint, 70% of each user's pairs (rounded) on the pretraining side, the same in every
    call, another one for another partition seed, and the validation draw's seed is part of the
    window (a snapshot of seed 0 overlaps a seed-1 model); data.id_partition file_order gives each
    user's older pairs (file order) to pretraining. Mutations caught: a partition of rows across
    all users (per-user shares drift), an unseeded draw, val_seed ignored in overlaps(), file_order
    ranked from the newest pair."""
    ws = _adjacency(tmp_path)
    _, e = _engagements(ws)
    pre, ret = windows(e, "given", 0.7, 0)
    mp, mr = mask(e, pre), mask(e, ret)
    train = e.part == Part.TRAIN
    assert not (mp & mr).any() and ((mp | mr) == train).all()
    for u in np.unique(e.user[train]):
        n = int((train & (e.user == u)).sum())
        assert int((mp & (e.user == u)).sum()) == int(np.floor(0.7 * n + 0.5))
    assert (mask(e, windows(e, "given", 0.7, 0)[0]) == mp).all()
    assert not (mask(e, windows(e, "given", 0.7, 1)[0]) == mp).all()
    assert not pre.overlaps(ret)
    assert windows(e, "given", 0.7, 0, val_seed=1)[0].overlaps(ret)
    fpre, fret = windows(e, "given", 0.7, 0, rule="file_order")
    fp, fr = mask(e, fpre), mask(e, fret)
    assert not (fp & fr).any() and ((fp | fr) == train).all() and fpre.overlaps(ret)
    for u in np.unique(e.user[train]):
        mine = e.user == u
        assert int((fp & mine).sum()) == int(np.floor(0.7 * (train & mine).sum() + 0.5))
        assert e.t[fp & mine].max() < e.t[fr & mine].min()  # the older pairs in file order pretrain


def test_auto_partition_follows_the_lines_order(tmp_path):
    """data.id_partition auto (the default) partitions by file order where the lines are in
    engagement order (data.given_validation resolves last: the file order is each user's time) and
    at random elsewhere, from what pretrain-ids and the retrieval model both resolve. Mutations
    caught: auto always random, auto always file_order, auto left unresolved in the window."""
    from ebr.config import RunConfig
    from ebr.pretrain.ids import resolve_window

    for order, rule in (("engagement", "file_order"), ("random", "random")):
        ws = _adjacency(tmp_path / order, order=order)
        cfg = RunConfig.load(None, {})
        assert cfg.data.id_partition == "auto"
        fs = build_feature_state(ws)
        split = load_split(ws, None)
        e = load_engagements(ws, fs, split, seed=0)
        w = resolve_window(e, split, cfg, None)
        assert w.rule == rule, order
        assert (mask(e, w) == mask(e, windows(e, split.name, 0.7, 0, 0, rule)[0])).all()


def _auc(user_t: np.ndarray, pin_t: np.ndarray, users: np.ndarray, pins: np.ndarray, among: np.ndarray,
         seed: int = 0) -> float:
    """P(score of a held-out positive > score of a random pin of `among`) with normalised rows."""
    u = user_t / np.maximum(np.linalg.norm(user_t, axis=1, keepdims=True), 1e-9)
    p = pin_t / np.maximum(np.linalg.norm(pin_t, axis=1, keepdims=True), 1e-9)
    neg = np.random.default_rng(seed).choice(among, len(users))
    return float(np.mean((u[users] * p[pins]).sum(1) > (u[users] * p[neg]).sum(1)))


def test_pretraining_learns_held_out_pairs(snap):
    """The pretrained tables rank a user's later engagements (the retrieval window, never read by
    pretraining; pairs new to it, between users and pins it saw) above random pins it saw: AUC >
    0.62 (measured 0.68; 0.5 at random, 0.51 after one epoch). The manifest records window,
    counts and a falling loss curve. Mutations caught: the loss's sign flipped or its backward
    skipped (the fused optimiser never steps): AUC about 0.5; examples not restricted to the window
    (counts differ)."""
    ws, m = snap
    fs, e = _engagements(ws)
    U, P = snapshots.load_tables(ws, m, fs.users, fs.pins)
    pre, ret = windows(e, "temporal", 0.7, 0)
    cfg = RunConfig()
    held = positive_examples(e, cfg.features, (Part.TRAIN,), within=mask(e, ret))
    mp = mask(e, pre)
    seen, users, pins = set(zip(e.user[mp].tolist(), e.pin[mp].tolist())), set(e.user[mp]), set(e.pin[mp])
    new = np.array([(u, p) not in seen and u in users and p in pins for u, p in zip(held.user, held.pin)])
    assert new.sum() > 200
    assert _auc(U, P, held.user[new], held.pin[new], np.array(sorted(pins))) > 0.62
    assert m["counts"]["examples"] == len(positive_examples(e, cfg.features, (Part.TRAIN,), within=mask(e, pre)).user)
    assert m["window"] == pre.to_dict() and m["dim"] == 16 and U.shape == (len(fs.users), 16)
    assert m["loss_curve"][-1] < 0.8 * m["loss_curve"][0]


def test_two_processes_match_one(snap):
    """`torchrun --nproc_per_node 2 -m ebr.cli -- pretrain-ids` (gloo, the tables sharded
    table-wise on two ranks, each rank half of every global batch, columns gathered across ranks)
    gives the one-process run's loss curve (relative difference < 1e-3) and tables (max abs
    difference < 1e-3). Mutations caught: a rank computing the loss over its own rows' columns
    only (no gather: the curve differs), each rank's loss normalised by its local batch."""
    ws, one = snap
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [x for k, v in PRE.items() for x in ("--set", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29600 + os.getpid() % 300), "-m", "ebr.cli", "--", "--quiet", "pretrain-ids", "-w",
                        str(ws.root), "--run", "t-two", *sets], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = next(m for m in snapshots.list_snapshots(ws) if m["name"] == "t-two")
    assert two["processes"] == 2 and one["processes"] == 1
    np.testing.assert_allclose(two["loss_curve"], one["loss_curve"], rtol=1e-3)
    fs = build_feature_state(ws)
    tables = [snapshots.load_tables(ws, m, fs.users, fs.pins) for m in (one, two)]
    for a, b in zip(*tables):
        assert np.abs(a - b).max() < 1e-3


def test_registry_chooses_non_overlapping_and_refuses_the_rest(snap, tmp_path):
    """choose(): the latest snapshot whose window ends before the training window; an overlapping
    one (--window train) is refused by name unless allow_overlap; a tampered table fails its
    content hash. Mutations caught: choice by creation time alone (the overlapping, newer
    snapshot wins), allow_overlap ignored, the hash not checked."""
    ws, one = snap
    fs, e = _engagements(ws)
    _, ret = windows(e, "temporal", 0.7, 0)
    whole = pretrain_ids(ws, RunConfig.load(None, {**PRE, "pretrain.epochs": 1}), window="train", name="t-whole",
                         progress=False)
    assert whole["window"]["side"] == "train"
    chosen = snapshots.choose(ws, ret)
    assert chosen["name"] in ("t-one", "t-two") and not snapshots.IdWindow.from_dict(chosen["window"]).overlaps(ret)
    with pytest.raises(EbrError, match="overlaps"):
        snapshots.choose(ws, ret, "t-whole")
    assert snapshots.choose(ws, ret, "t-whole", allow_overlap=True)["name"] == "t-whole"
    bad = dict(one, name="t-bad")
    import shutil

    shutil.copytree(snapshots.root(ws) / "t-one", snapshots.root(ws) / "t-bad")
    t = np.load(snapshots.root(ws) / "t-bad" / "pin_table.npy")
    t[3, 0] += 1.0
    np.save(snapshots.root(ws) / "t-bad" / "pin_table.npy", t)
    with pytest.raises(EbrError, match="content hash"):
        snapshots.load_tables(ws, bad, fs.users, fs.pins)
    shutil.rmtree(snapshots.root(ws) / "t-bad")


@pytest.mark.parametrize("args, fragment", [
    (["pretrain-ids", "--window", "2020-01-01:2020-02-01"], "no positive engagements"),
    (["pretrain-ids", "--window", "2020-01-01:2099-02-01"], "leak"),
    (["pretrain-ids", "--split", "nope"], "no split 'nope'"),
    (["pretrain-ids", "--window", "yesterday"], "START:END"),
    (["train", "--run", "dimx", "--set", "model.id_embeddings=frozen", "--set", "model.id_dim=24", "--epochs", "1"],
     "width 16"),
])
def test_bad_pretraining_requests_are_one_line_errors(snap, args, fragment):
    """An empty window, a window into validation/test, an unknown split, a malformed window and a
    model.id_dim that contradicts the snapshot: exit 2 with one line naming the fix, no traceback.
    Mutation caught: custom windows not clipped to the training part (pretraining on test)."""
    ws, _ = snap
    r = subprocess.run([sys.executable, "-m", "ebr.cli", "--quiet", *args, "-w", str(ws.root)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr[-1500:]


@pytest.fixture(scope="module")
def frozen(snap):
    from ebr.index.bundle import build_bundle
    from ebr.train.loop import train

    ws, _ = snap
    runs = {}
    for mode in ("frozen", "finetune", "recent"):
        ids = {"data.recent_only": True} if mode == "recent" else {"model.id_embeddings": mode}
        cfg = RunConfig.load(None, {"train.epochs": 1, "train.batch_size": 256, "model.hidden": [32],
                                    "train.id_snapshot": "t-one", "train.refit": False, **ids, **NO_CHOICE})
        runs[mode] = train(ws, cfg, run=f"ids-{mode}", progress=False)
    return ws, runs, build_bundle(ws, "ids-frozen", "temporal")


def test_frozen_tables_stay_and_training_reads_the_recent_window(frozen):
    """frozen: the checkpoint's user and pin ID tables equal the snapshot's, bit for bit, after
    training; finetune: they moved. The model trained only on the retrieval window's positives,
    as did the data.recent_only ablation without IDs, and the run records the snapshot and that it
    does not overlap. Mutations caught: the frozen flag ignored (the tables take gradients); the
    window filter dropped (all training positives used); the snapshot loaded by code instead of id
    (rows shuffled)."""
    ws, runs, _ = frozen
    fs, e = _engagements(ws)
    m = next(x for x in snapshots.list_snapshots(ws) if x["name"] == "t-one")
    U, P = snapshots.load_tables(ws, m, fs.users, fs.pins)
    _, ret = windows(e, "temporal", 0.7, 0)
    n_ret = len(positive_examples(e, RunConfig().features, (Part.TRAIN,), within=mask(e, ret)).user)
    assert runs["recent"]["train_examples"] == n_ret and "id_embeddings" not in runs["recent"]
    for mode, same in (("frozen", True), ("finetune", False)):
        s = runs[mode]
        assert s["train_examples"] == n_ret
        assert s["id_embeddings"]["snapshot"] == "t-one" and s["id_embeddings"]["overlaps_training_window"] is False
        ck = torch.load(ws.run_dir(f"ids-{mode}") / "checkpoints" / "best.pt", weights_only=True)["model"]
        for key, want in (("user.user_id.weight", U), ("items.id.weight", P)):
            assert np.array_equal(ck[key].numpy(), want) == same, (mode, key)


def test_bundle_serves_the_user_ids(frozen):
    """The bundle's user tower carries the user ID table: the same stored inputs embed differently
    under the user's own code than as an unknown user (code 0 or OOV, both the zero row), and the
    served answer (Retriever.retrieve, what /v1/retrieve calls) equals the batch path `ebr eval`
    scores with (retrieve_codes). Mutations caught: the tower called with user code 0 in one path
    (served != eval); the OOV row not zero."""
    from ebr.serve.retriever import Retriever

    _, _, bundle = frozen
    r = Retriever(bundle)
    codes = np.array([c for c in range(FIRST_ID, FIRST_ID + 200) if r.is_warm(c)][:20])
    inputs = r.stored_inputs(codes)
    own = r.embed(*inputs, users=codes)
    pad = r.embed(*inputs, users=np.zeros_like(codes))
    oov = r.embed(*inputs, users=np.ones_like(codes))
    assert torch.equal(pad, oov) and (own - pad).abs().max() > 1e-3
    _, top = r.retrieve_codes(codes, 30)
    for c, row in zip(codes.tolist(), top):
        served = r.retrieve(r.fs.users.ids[c - FIRST_ID], 30)
        assert served.pin_ids == [r.pin_ids[x] for x in row[row >= 0]]
    assert json.loads((bundle / "manifest.json").read_text())


def test_a_crashed_pretraining_resumes_to_the_uninterrupted_tables(snap, monkeypatch):
    """A run that crashes inside its second epoch leaves no snapshot, only its first epoch's
    checkpoint; `--resume` continues from it and ends with the uninterrupted run's loss curve and
    tables (max abs difference < 1e-6), and the checkpoint is removed once the snapshot is whole.
    Resuming with other settings, or without a checkpoint, is a one-line error naming the fix.
    Mutations caught: the Adagrad accumulators not restored (larger steps after the resume), the
    resume starting again from epoch 0, the tables not restored, the fingerprint not checked, the
    checkpoint written before the epoch's last step."""
    import ebr.pretrain.ids as ids

    ws, _ = snap
    cfg = RunConfig.load(None, {**PRE, "pretrain.epochs": 3})
    calls = {"n": 0}
    real = ids.sampled_softmax_logq

    def counting(*a, **k):
        calls["n"] += 1
        if calls.get("crash") and calls["n"] == calls["crash"]:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ids, "sampled_softmax_logq", counting)
    ref = pretrain_ids(ws, cfg, name="t-ref", progress=False)
    per_epoch = calls["n"] // 3
    assert per_epoch * 3 == calls["n"] and per_epoch > 2
    calls.update(n=0, crash=per_epoch + 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_ids(ws, cfg, name="t-res", progress=False)
    assert "t-res" not in [m["name"] for m in snapshots.list_snapshots(ws)]
    assert (ids.partial_dir(ws, "t-res") / "last.json").is_file()
    with pytest.raises(EbrError, match="dim|config"):
        pretrain_ids(ws, RunConfig.load(None, {**PRE, "pretrain.epochs": 3, "pretrain.dim": 8}), name="t-res",
                     progress=False, resume=True)
    with pytest.raises(EbrError, match="no unfinished pretraining 't-nope'"):
        pretrain_ids(ws, cfg, name="t-nope", progress=False, resume=True)
    calls.update(n=0, crash=None)
    res = pretrain_ids(ws, cfg, name="t-res", progress=False, resume=True)
    assert calls["n"] == 2 * per_epoch and res["resumed_after_epoch"] == 1
    np.testing.assert_allclose(res["loss_curve"], ref["loss_curve"], rtol=1e-6)
    fs = build_feature_state(ws)
    for a, b in zip(*[snapshots.load_tables(ws, m, fs.users, fs.pins) for m in (ref, res)]):
        assert np.abs(a - b).max() < 1e-6
    assert not ids.partial_dir(ws, "t-res").exists()
    assert res["throughput"]["examples_per_s"] > 0


def test_two_processes_resume_to_the_uninterrupted_tables(snap):
    """Under torchrun (2 processes, tables sharded table-wise: each rank holds one table and its
    Adagrad accumulators) a run killed inside its second of three epochs (EBR_FAIL_PHASE=pretrain)
    resumes with `--resume`, each rank restoring its own shards, and ends with the one-process
    uninterrupted run's loss curve and tables (within 1e-3, as two processes match one). Mutations
    caught: the accumulators of one rank's table not saved (a KeyError or larger steps), every rank
    reading rank 0's file."""
    ws, _ = snap
    cfg = RunConfig.load(None, {**PRE, "pretrain.epochs": 3})
    ref = next((m for m in snapshots.list_snapshots(ws) if m["name"] == "t-ref"), None) or pretrain_ids(
        ws, cfg, name="t-ref", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [x for k, v in {**PRE, "pretrain.epochs": 3}.items() for x in ("--set", f"{k}={v}")]
    per_epoch = -(-ref["counts"]["examples"] // PRE["pretrain.batch_size"])

    def run(*extra, fail=None):
        e = {**env, **({"EBR_FAIL_PHASE": "pretrain", "EBR_FAIL_AT_STEP": str(fail)} if fail else {})}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(29300 + os.getpid() % 300), "-m", "ebr.cli", "--", "--quiet",
                               "pretrain-ids", "-w", str(ws.root), "--run", "t-two-res", *sets, *extra], env=e,
                              capture_output=True, text=True, timeout=300)

    assert run(fail=per_epoch + 2).returncode != 0
    assert "t-two-res" not in [m["name"] for m in snapshots.list_snapshots(ws)]
    r = run("--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    two = next(m for m in snapshots.list_snapshots(ws) if m["name"] == "t-two-res")
    assert two["processes"] == 2 and two["resumed_after_epoch"] == 1
    np.testing.assert_allclose(two["loss_curve"], ref["loss_curve"], rtol=1e-3)
    fs = build_feature_state(ws)
    for a, b in zip(*[snapshots.load_tables(ws, m, fs.users, fs.pins) for m in (ref, two)]):
        assert np.abs(a - b).max() < 1e-3
