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


def _adjacency(tmp_path, n_users: int = 200) -> Workspace:
    rng = np.random.default_rng(0)
    tr, te = [], []
    for u in range(n_users):
        items = rng.choice(np.arange((u % 4) * 50, (u % 4) * 50 + 50), 12, replace=False)
        tr.append(" ".join(map(str, [u, *items[:10]])))
        te.append(" ".join(map(str, [u, *items[10:]])))
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
    """Mutation caught: validation drawn as 10% of all rows (users get 0, 1, 2, 3... pins)."""
    ws = _adjacency(tmp_path)
    e = load_engagements(ws, build_feature_state(ws), load_split(ws, None), seed=3)
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
    assert json.loads((ws.split_dir("given") / "manifest.json").read_text())["validation"].startswith("a random 10%")
