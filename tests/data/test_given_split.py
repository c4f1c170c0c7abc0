"""The given split (adjacency files, no time) is the same in every process, and so are the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from ebr.data.importers import import_adjacency
from ebr.data.splits import Part, load_split
from ebr.features.examples import load_engagements
from ebr.features.state import build_feature_state
from ebr.workspace import Workspace

SCRIPT = r"""
import hashlib, sys, torch
from ebr.config import RunConfig
from ebr.data.splits import load_split
from ebr.features.examples import load_engagements
from ebr.features.state import build_feature_state
from ebr.train.loop import train
from ebr.workspace import Workspace
ws = Workspace.at(sys.argv[1])
fs = build_feature_state(ws)
e = load_engagements(ws, fs, load_split(ws, None), seed=0)
h = hashlib.sha256()
for a in (e.user, e.pin, e.t, e.part, e.action):
    h.update(a.tobytes())
cfg = RunConfig.load(None, {"train.epochs": 2, "train.batch_size": 128, "model.hidden": [32], "train.val_users": 50})
train(ws, cfg, run=sys.argv[2], progress=False)
ck = torch.load(ws.run_dir(sys.argv[2]) / "checkpoints" / "best.pt", weights_only=True)
w = hashlib.sha256()
for k in sorted(ck["model"]):
    w.update(ck["model"][k].numpy().tobytes())
print(h.hexdigest(), w.hexdigest(), torch.get_num_threads())
"""


def _adjacency(tmp_path, n_users: int = 200, order: str = "random") -> Workspace:
    """Each user 10 training and 2 test items of one of 4 groups of 50: drawn at random, each line
    in that random order (`random`) or in ascending id order (`id`, as LightGCN-style files store
    them); or (`engagement`) 12 consecutive items of the group's timeline (a fixed random
    permutation), in timeline order with neighbours swapped at random (p 0.4 each), the last 2
    as test: consecutive pairs recur across users, in either direction."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    timelines = [rng.permutation(np.arange(g * 50, g * 50 + 50)) for g in range(4)]
    tr, te = [], []
    for u in range(n_users):
        items = rng.choice(np.arange((u % 4) * 50, (u % 4) * 50 + 50), 12, replace=False)
        if order == "engagement":
            start = rng.integers(0, 39)
            items = timelines[u % 4][start: start + 12].copy()
            for j in np.flatnonzero(rng.random(11) < 0.4):  # each user's own order, locally
                items[j], items[j + 1] = items[j + 1], items[j]
        train, test = (sorted(items[:10]), sorted(items[10:])) if order == "id" else (items[:10], items[10:])
        tr.append(" ".join(map(str, [u, *train])))
        te.append(" ".join(map(str, [u, *test])))
    (tmp_path / "train.txt").write_text("\n".join(tr))
    (tmp_path / "test.txt").write_text("\n".join(te))
    ws = Workspace.at(tmp_path / "ws")
    import_adjacency(ws, tmp_path / "train.txt", tmp_path / "test.txt")
    return ws


def test_given_split_and_weights_are_identical_across_processes(tmp_path):
    """Three processes, OMP_NUM_THREADS=1 and no train.threads: byte-identical split arrays and
    trained weights, and training ran on one thread. Mutations caught: validation drawn over an
    unordered query result, or pseudo-time from a window with ties (the split differed per
    process); training that sets its own thread count."""
    ws = _adjacency(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    outs = [subprocess.run([sys.executable, "-c", SCRIPT, str(ws.root), f"r{i}"], env=env, capture_output=True,
                           text=True, timeout=300) for i in range(3)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-3000:]
    lines = [o.stdout.strip().splitlines()[-1].split() for o in outs]
    assert len({x[0] for x in lines}) == 1, "the split differs between processes"
    assert len({x[1] for x in lines}) == 1, "single-threaded training gave different weights"
    assert {x[2] for x in lines} == {"1"}


def test_given_validation_is_ten_percent_of_each_users_training_pins(tmp_path):
    """Lines in id order: a seeded random 10% of each user's training pins. Mutation caught:
    validation drawn as 10% of all rows (users get 0, 1, 2, 3... pins)."""
    ws = _adjacency(tmp_path, order="id")
    e = load_engagements(ws, build_feature_state(ws), load_split(ws, None), seed=3)
    assert e.given_validation == "random"
    users = np.unique(e.user)
    val = np.bincount(e.user[e.part == Part.VALIDATION], minlength=users.max() + 1)[users]
    test = np.bincount(e.user[e.part == Part.TEST], minlength=users.max() + 1)[users]
    assert (val == 1).all() and (test == 2).all()
    # pseudo-time is the file order: every test pair after every training pair of the user
    for u in users[:20]:
        m = e.user == u
        assert e.t[m][e.part[m] == Part.TEST].min() > e.t[m][e.part[m] != Part.TEST].max()
    other = load_engagements(ws, build_feature_state(ws), load_split(ws, None), seed=4)
    assert not np.array_equal(other.part, e.part), "the draw must depend on the seed"
    assert "10%" in json.loads((ws.split_dir("given") / "manifest.json").read_text())["validation"]


def test_given_validation_is_each_users_last_rows_when_lines_are_in_engagement_order(tmp_path):
    """Lines in engagement order (consecutive items recur across users): data.given_validation auto
    holds out each user's last training row in file order (10% of 10), the same for every seed,
    as the test is the lines' last rows, and trains on point-in-time histories with positions;
    lines sorted (ids up or down, numeric or as text, any key) or in a random order, or `random`
    asked for, draw at random. Mutations caught: the detection inverted, a random order read as
    engagement order (both margins over the shuffled baseline dropped), the first rows held out in
    place of the last, the last-rows mode ignored (a random draw), numeric ids compared as text,
    descending or text-sorted lines read as engagement order (the direction test dropped), users
    with fewer than 3 rows judged (they ascend by chance), pairs read across two users' lines, an
    empty training part crashing, the resolved mode, the detected order or the resolved
    histories not recorded in summary.json."""
    from ebr.config import RunConfig
    from ebr.features.examples import _sorted_lines, line_order
    from ebr.train.loop import train

    def detected(ws):
        fs = build_feature_state(ws)
        e = load_engagements(ws, fs, load_split(ws, None), seed=3)
        return fs, e, line_order(e.user, e.pin, fs.pins.decode(e.pin), e.part != Part.TEST)

    ws = _adjacency(tmp_path, order="engagement")
    fs, e, order = detected(ws)
    assert order == "engagement" and e.given_validation == "last" and e.line_order == "engagement"
    lines = {int(ln.split()[0]): ln.split()[1:] for ln in (tmp_path / "train.txt").read_text().splitlines()}
    names = fs.users.decode(e.user[e.part == Part.VALIDATION])
    held = fs.pins.decode(e.pin[e.part == Part.VALIDATION])
    assert len(held) == len(lines)
    assert all(lines[int(u)][-1] == p for u, p in zip(names, held)), "not each user's last training row"
    assert np.array_equal(load_engagements(ws, fs, load_split(ws, None), seed=4).part, e.part)
    other = load_engagements(ws, fs, load_split(ws, None), seed=3, given_validation_mode="random")
    assert other.given_validation == "random" and not np.array_equal(other.part, e.part)
    for kind, want in (("id", "sorted"), ("random", "none")):
        _, e2, order2 = detected(_adjacency(tmp_path / kind, order=kind))
        assert order2 == want and e2.given_validation == "random", kind
    # the engagement lines sorted another way: by id descending, by id as text (one id not a
    # number), by a key that is no id (the recurring pairs then run one way)
    tr = e.part != Part.TEST
    u, p = e.user[tr], e.pin[tr]
    ids = np.array(fs.pins.decode(p), dtype=object)
    num = np.array([int(x) for x in ids])
    rank = np.random.default_rng(0).permutation(int(p.max()) + 1)
    for key in (-num, np.array([str(x) for x in num]), rank[p]):
        o = np.lexsort((key, u))
        named = ids[o].copy()
        named[0] = "x" + named[0]
        assert line_order(u[o], p[o], list(named), np.ones(len(o), dtype=bool)) == "sorted"
    assert line_order(u, p, list(ids), np.zeros(len(u), dtype=bool)) == "none"  # no training rows
    # sparse lines (no pair recurs): only the ids can tell a sort, down or as text
    user, r = np.repeat(np.arange(60), 5), np.arange(60)[:, None]
    items = np.c_[r + 1, 900 + r, 1000 + r, 10000 * (r + 1) + 5, 70000000 + r]  # ascending numbers
    as_text = np.array([sorted(x, key=str) for x in items])  # e.g. 1, 1000, 10005, 70000000, 900
    assert not any(_sorted_lines(np.zeros(5, int), x) for x in as_text)  # not sorted as numbers
    for lines in (items[:, ::-1], as_text):
        assert line_order(user, lines.ravel(), [str(x) for x in lines.ravel()], np.ones(300, dtype=bool)) == "sorted"
    # users with one or two rows ascend by chance: only users with 3+ rows are judged
    user = np.r_[np.repeat(np.arange(300), 2), np.repeat(np.arange(300, 320), 5)]
    pins = np.r_[np.tile([1, 2], 300), np.tile([5, 9, 1, 7, 3], 20)]
    assert not _sorted_lines(user, pins)
    # pairs are read within a user: lines 'u 1 a b c 0' (a, b, c never repeat) put (0, 1) at
    # every boundary between two users, which is no order of any user's items
    user = np.repeat(np.arange(200), 5)
    pins = np.c_[np.ones(200, int), np.arange(2, 602).reshape(200, 3), np.zeros(200, int)].ravel()
    assert line_order(user, pins, [str(x) for x in pins], np.ones(len(user), dtype=bool)) == "none"
    over = {"train.batch_size": 128, "model.hidden": [16], "train.val_users": 20, "train.epochs": 1,
            "train.min_steps": 0, "train.refit": False, "train.choose_regularised": False}
    s = train(ws, RunConfig.load(None, over), run="g", progress=False)
    assert s["given_validation"] == "last" and s["line_order"] == "engagement"
    assert s["history_as_of"] == "example" and s["history_positions"]


def test_engagement_ordered_lines_train_on_point_in_time_histories(tmp_path):
    """On lines in engagement order a training row's history is its user's events before it in
    file order (the prefix), not the end-of-data history; on id-ordered lines the end. Mutations
    caught: the batch built with end-of-data histories on engagement lines (`ordered` ignored
    where histories are assembled)."""
    from ebr.config import RunConfig
    from ebr.features.examples import T_MAX
    from ebr.train.distributed import Ranks
    from ebr.train.loop import assemble, prepare

    cfg = RunConfig.load(None, {"train.batch_size": 128, "features.history_len": 5})
    for order, prefix in (("engagement", True), ("id", False)):
        d = prepare(_adjacency(tmp_path / order, order=order), cfg)
        ex = d.examples
        idx = np.random.default_rng(0).permutation(len(ex.user))[:128]
        hist = assemble(d, cfg, idx, 1, Ranks()).ub.hist.numpy()
        want = d.hist.at(ex.user[idx], ex.t[idx], 5)[0]
        end = d.hist.at(ex.user[idx], np.full(len(idx), T_MAX), 5)[0]
        assert np.array_equal(hist, want) == prefix and not np.array_equal(want, end), order


def test_resume_refuses_a_checkpoint_of_another_given_validation(tmp_path):
    """A run's 'last' checkpoint records the resolved data.given_validation; resuming it where the
    run resolves another (e.g. a checkpoint saved before the setting, always random, on lines now
    read as engagement order) is a clear error naming the setting; the same one resumes. Mutations
    caught: the value not saved, the check dropped, a missing value read as the run's own."""
    import pytest
    import torch

    from ebr.config import RunConfig
    from ebr.errors import EbrError
    from ebr.train.loop import train

    ws = _adjacency(tmp_path, order="engagement")
    over = {"train.batch_size": 128, "model.hidden": [16], "train.val_users": 20, "train.epochs": 2,
            "train.min_steps": 0, "train.refit": False, "train.choose_regularised": False}
    train(ws, RunConfig.load(None, over), run="r", progress=False)
    last = ws.run_dir("r") / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["given_validation"] == "last"
    train(ws, RunConfig.load(None, over), run="r", progress=False, resume=True)  # the same: resumes
    del state["given_validation"]
    torch.save(state, last)
    with pytest.raises(EbrError, match="data.given_validation"):
        train(ws, RunConfig.load(None, over), run="r", progress=False, resume=True)
    # the histories' resolution is recorded too: end-of-data histories on randomly ordered lines
    # (mutation caught: every checkpoint recording `example`)
    rnd = _adjacency(tmp_path / "random", order="random")
    train(rnd, RunConfig.load(None, over), run="r", progress=False)
    state = torch.load(rnd.run_dir("r") / "checkpoints" / "last.pt", weights_only=True)
    assert (state["given_validation"], state["history_as_of"]) == ("random", "end")


def test_untimed_training_histories_are_the_evaluation_history_without_the_target(tmp_path):
    """Data without real time (a given split whose lines are in id order: the file order is no
    time, validation rows are drawn at random): features.history_as_of auto reads each training
    row's history as evaluation reads it, the user's last L visible events as of the end, with the
    row's own pin left out and one more event read in its place (L = 5 here; every user has 9
    visible events, so every row sees 5 items). Mutations caught: the target kept in its own
    history (a model that learns to copy it), auto read as `example` (the file-order prefix), the
    pin left out but its action kept (pooled as an item), the target blanked without reading the
    next event (4 items where the target is among the last 5)."""
    from ebr.config import RunConfig
    from ebr.features.examples import T_MAX
    from ebr.train.distributed import Ranks
    from ebr.train.loop import assemble, prepare

    ws = _adjacency(tmp_path, order="id")
    over = {"train.batch_size": 128, "features.history_len": 5}
    cfg = RunConfig.load(None, over)
    d = prepare(ws, cfg)
    ex, L = d.examples, cfg.features.history_len
    idx = np.random.default_rng(0).permutation(len(ex.user))[:128]
    b = assemble(d, cfg, idx, 1, Ranks())
    hist, act = b.ub.hist.numpy(), b.ub.actions.numpy()
    full, full_act = d.hist.at(ex.user[idx], np.full(len(idx), T_MAX), L + 1)
    target = ex.pin[idx]
    assert not (hist == target[:, None]).any(), "a row's target is in its own history"
    for i in range(len(idx)):
        rest = [(p, a) for p, a in zip(full[i], full_act[i]) if p != target[i]][-L:]
        want = [(0, 0)] * (L - len(rest)) + rest
        assert [tuple(x) for x in zip(hist[i], act[i])] == want, i
    assert ((hist > 0).sum(1) == L).all() and (act[hist == 0] == 0).all()
    assert (full[:, 1:] == target[:, None]).any(1).mean() > 0.3, "targets among the last L (the check is not vacuous)"
    prefix = d.hist.at(ex.user[idx], ex.t[idx], L)[0]
    assert not np.array_equal(hist, prefix)
    # asked for explicitly, the prefix comes back
    cfg_ex = RunConfig.load(None, {**over, "features.history_as_of": "example"})
    assert np.array_equal(assemble(d, cfg_ex, idx, 1, Ranks()).ub.hist.numpy(), prefix)


def test_default_epoch_cap_gives_small_data_min_steps(tmp_path):
    """train.epochs unset: 8, raised on small data until the epochs allow train.min_steps steps;
    set: exactly that many. Mutations caught: the cap ignored by the training loop (8 epochs), the
    cap applied to an explicit train.epochs, steps per epoch rounded down."""
    from ebr.config import RunConfig
    from ebr.train.loop import epoch_cap, train

    ws = _adjacency(tmp_path, order="id")
    over = {"train.batch_size": 128, "model.hidden": [16], "train.val_users": 20, "train.patience": 100,
            "train.refit": False, "train.min_steps": 150}
    s = train(ws, RunConfig.load(None, over), run="cap", progress=False)
    per_epoch = -(-s["train_examples"] // 128)
    assert per_epoch * 8 < 150 and s["epochs"] == -(-150 // per_epoch) and s["steps"] >= 150
    assert s["epoch_cap"] == s["epochs"] and s["history_as_of"] == "end"  # recorded
    assert epoch_cap(RunConfig.load(None, over), 128 * 100) == 8
    assert epoch_cap(RunConfig.load(None, {**over, "train.epochs": 3}), 10) == 3


def test_early_stopping_waits_for_stop_after_steps(tmp_path):
    """With lr 0 validation recall never improves after epoch 1, so patience 1 would stop at epoch 2;
    train.stop_after_steps keeps the run going until the first epoch end at or past that step.
    Mutations caught: the guard ignored (stops at epoch 2), the guard compared with the epoch
    instead of the step (stops too late or never)."""
    from ebr.config import RunConfig
    from ebr.train.loop import train

    ws = _adjacency(tmp_path)
    over = {"train.batch_size": 128, "model.hidden": [16], "train.val_users": 20, "train.patience": 1,
            "train.refit": False, "train.lr": 0.0, "train.epochs": 12}
    s = train(ws, RunConfig.load(None, {**over, "train.stop_after_steps": 0}), run="s0", progress=False)
    per_epoch = -(-s["train_examples"] // 128)
    assert s["epochs"] == 2
    s = train(ws, RunConfig.load(None, {**over, "train.stop_after_steps": 4 * per_epoch + 1}), run="s5", progress=False)
    assert s["epochs"] == 5 and s["steps"] == 5 * per_epoch


def test_history_dropout_leaves_out_a_share_of_each_rows_items(tmp_path):
    """train.history_dropout p: each history item of a training row is left out (pin and action:
    padding) with probability p, drawn per step; the rest of the history is unchanged. Mutations
    caught: pins dropped but actions kept, the same draw at every step, p read as the share kept,
    each DDP rank drawing its own mask for its rows (a 2-process run unlike a 1-process one)."""
    from ebr.config import RunConfig
    from ebr.train.distributed import Ranks
    from ebr.train.loop import assemble, prepare

    ws = _adjacency(tmp_path, order="id")  # end histories: every row 9 items
    cfg = RunConfig.load(None, {"train.batch_size": 128})
    d = prepare(ws, cfg)
    idx = np.random.default_rng(0).permutation(len(d.examples.user))[:128]
    full = assemble(d, cfg, idx, 1, Ranks()).ub
    cfg_d = RunConfig.load(None, {"train.batch_size": 128, "train.history_dropout": 0.3})
    got = [assemble(d, cfg_d, idx, step, Ranks()).ub for step in (1, 2)]
    h0, a0 = full.hist.numpy(), full.actions.numpy()
    for ub in got:
        h, a = ub.hist.numpy(), ub.actions.numpy()
        kept = h > 0
        assert np.array_equal(h[kept], h0[kept]) and np.array_equal(a[kept], a0[kept])
        assert not a[~kept].any(), "a dropped item keeps its action"
        share = 1 - kept.sum() / (h0 > 0).sum()
        assert 0.25 < share < 0.35, share
    assert not np.array_equal(got[0].hist.numpy(), got[1].hist.numpy()), "each step draws anew"
    # two processes (DDP): each rank's rows carry the one-process batch's draw for those rows
    halves = [assemble(d, cfg_d, idx, 1, Ranks(rank=r, world=2)).ub.hist.numpy() for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), got[0].hist.numpy()), "ranks draw their own masks"


def test_left_out_pin_is_compacted_out_of_long_histories(tmp_path):
    """user_batch(leave_out=...) on a history longer than L where the left-out pin occurs twice in
    the user's last L + 1 events: both occurrences gone (pin and action), the other events in
    their order, right-aligned, padding on the left. Mutations caught: the left-out events kept
    when they are not the oldest (zeroing skipped, or pins zeroed but not actions), an unstable
    sort (the events reordered)."""
    from ebr.config import RunConfig
    from ebr.data.importers import import_interactions
    from ebr.data.splits import make_temporal
    from ebr.features.batches import user_batch
    from ebr.features.examples import T_MAX
    from ebr.train.loop import prepare

    rows = ["user_id,item_id,ts,action"]
    names = [f"p{i}" for i in range(60)]
    names[52] = names[57] = "X"  # a repeat among the last 51
    for i, n in enumerate(names):
        rows.append(f"a,{n},2026-01-01T{i // 60:02d}:{i % 60:02d}:00Z,click")
    rows += [f"b,q{i},2026-01-02T00:{i:02d}:00Z,click" for i in range(30)]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, tmp_path / "x.csv")
    make_temporal(ws, test_fraction=0.1, val_fraction=0.02)
    d = prepare(ws, RunConfig.load(None, {"train.batch_size": 16}))
    a = d.fs.users.encode(["a"])
    x = d.fs.pins.encode(["X"])
    L = 50
    full, full_act = d.hist.at(a, np.array([T_MAX]), L + 1)
    ub = user_batch(a, np.array([T_MAX]), d.hist, d.users, L, leave_out=x)
    hist, act = ub.hist.numpy()[0], ub.actions.numpy()[0]
    assert (full[0] == x[0]).sum() == 2
    want = [p for p in full[0] if p != x[0]]
    assert hist.tolist() == [0] * (L - len(want)) + want
    assert (act[hist == 0] == 0).all() and (act[hist > 0] > 0).all()


def test_first_epoch_checks_can_select_a_step_inside_the_first_epoch(tmp_path, monkeypatch):
    """train.first_epoch_checks 3: validations at 1/4, 1/2 and 3/4 of the first epoch too (selection
    only); one of them can be the best (best.pt and the refit's step count follow it), and patience
    still counts epochs. Validation recall is scripted: 0.5, 0.9, 0.4 inside epoch 1, 0.6 at its
    end, then 0.7 and 0.65 at the next epochs' ends (two epochs without a better recall: patience
    2 stops after epoch 3; the first epoch, which improved inside, is no bad one). Mutations
    caught: checks at the wrong steps (or none), a check's improvement not kept (best_step at an
    epoch's end), best.pt not saved there, a worse check or the first epoch counted against
    patience (training stops after epoch 2), checks in the refit."""
    import torch

    from ebr.config import RunConfig
    from ebr.train import loop

    ws = _adjacency(tmp_path)
    script = iter([0.5, 0.9, 0.4, 0.6, 0.7, 0.65, 0.6, 0.6])
    monkeypatch.setattr(loop, "validation_recalls", lambda *a, **k: np.array([next(script)]))
    over = {"train.batch_size": 128, "model.hidden": [16], "train.epochs": 4, "train.patience": 2,
            "train.stop_after_steps": 0, "train.choose_pin_id": False, "train.choose_regularised": False}
    s = loop.train(ws, RunConfig.load(None, over), run="checks", progress=False)
    rows = [json.loads(x) for x in (ws.run_dir("checks") / "metrics.jsonl").read_text().splitlines()]
    select = [r for r in rows if r["phase"] == "select"]
    per_epoch = -(-s["train_examples"] // 128)
    inside = [r["step"] for r in select if r.get("within_epoch")]
    assert inside == [round(per_epoch * i / 4) for i in (1, 2, 3)] and len(set(inside)) == 3
    assert [r["step"] for r in select if not r.get("within_epoch")] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert s["selected_step"] == inside[1] and s["best_val_recall@100"] == 0.9
    assert torch.load(ws.run_dir("checks") / "checkpoints" / "best.pt", weights_only=True)["step"] == inside[1]
    assert s["refit"]["steps"] == inside[1] and not any(r.get("within_epoch") for r in rows if r["phase"] == "refit")
