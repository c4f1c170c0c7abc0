"""Distributed training on a real engine: `torchrun --nproc_per_node 2 -m ebr.cli -- train` (gloo,
DDP, in-batch negatives gathered across ranks, logQ over the global batch) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebr.config import RunConfig
from ebr.train.loop import train

SETS = {"train.epochs": 3, "train.batch_size": 256, "model.hidden": [64], "train.refit": False,
        "train.checkpoint_every": 10}


def _torchrun(ws, run: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    sets = [x for k, v in SETS.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29300 + os.getpid() % 300), "-m", "ebr.cli", "--", "--quiet", "train", "-w",
                           str(ws.root), "--run", run, *sets], env=env, capture_output=True, text=True, timeout=600)


def _metrics(ws, run: str) -> list[dict]:
    """The epochs' records (the first epoch's inner validations left out)."""
    rows = [json.loads(x) for x in (ws.run_dir(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if not r.get("within_epoch")]


@pytest.fixture(scope="module")
def runs(tiny_ws):
    torch.set_num_threads(1)  # like the ranks (OMP_NUM_THREADS=1): the same reduction order per rank
    try:
        train(tiny_ws, RunConfig.load(None, SETS), run="dist-one", progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    r = _torchrun(tiny_ws, "dist-two")
    assert r.returncode == 0, r.stderr[-3000:]
    return tiny_ws


def test_two_processes_match_one_process(runs):
    """Same global batch (256, 128 rows per rank): the 2-process loss curve is the 1-process one
    (relative difference < 2e-3 per epoch), the final weights agree (max abs difference < 0.02)
    and validation recall@100 within 0.05 (float sums in another order move a few top-100 ties).
    Mutations caught: the loss not scaled by the world size (DDP's average halves every step);
    each rank's softmax over its own rows' columns only (no gather); the loss normalised by the
    local batch; logQ from the local batch size."""
    ws = runs
    one, two = _metrics(ws, "dist-one"), _metrics(ws, "dist-two")
    assert [m["step"] for m in one] == [m["step"] for m in two] and len(one) == 3
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=2e-3)
    assert abs(two[-1]["val_recall@100"] - one[-1]["val_recall@100"]) < 0.05
    a = torch.load(ws.run_dir("dist-one") / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ws.run_dir("dist-two") / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.02
    s = json.loads((ws.run_dir("dist-two") / "summary.json").read_text())
    assert s["processes"] == 2


def test_two_process_run_beats_popularity(runs):
    """The goal's check: three epochs on two processes beat the popularity feed (recall@100 of the
    served bundle in `ebr eval`). Mutation caught: ranks training on different models (no DDP
    synchronisation: rank 0's checkpoint holds half the training)."""
    from ebr.eval.evaluate import evaluate

    res = evaluate(runs, "dist-two", None, peers=("popularity",), progress=False)
    r = {x["name"]: x["recall@100"] for x in res["results"]}
    assert r["two_tower"] > r["popularity"], r


def test_two_process_checkpoint_resumes_in_one_process(runs):
    """A 2-process run killed at step 50 (its last checkpoint: step 40) resumes with `--resume` in
    one process and ends where the uninterrupted 1-process run ends (loss per epoch within 2e-3).
    Mutations caught: checkpoints written per rank or holding the DDP wrapper's keys (the
    1-process model cannot load them), the epoch position saved per rank instead of globally."""
    ws = runs
    r = _torchrun(ws, "dist-resume", {"EBR_FAIL_AT_STEP": "50"})
    assert r.returncode != 0 and "injected failure" in r.stderr
    assert torch.load(ws.run_dir("dist-resume") / "checkpoints" / "last.pt", weights_only=True)["step"] == 40
    train(ws, RunConfig.load(None, SETS), run="dist-resume", resume=True, progress=False)
    one, resumed = _metrics(ws, "dist-one"), _metrics(ws, "dist-resume")
    assert resumed[-1]["step"] == one[-1]["step"]
    np.testing.assert_allclose(resumed[-1]["loss"], one[-1]["loss"], rtol=2e-3)
