"""A run killed at a fixed step and resumed gives the same weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from ebr.config import RunConfig
from ebr.train.loop import InjectedFailure, train

CFG = {"train.epochs": 2, "train.batch_size": 256, "train.checkpoint_every": 5, "train.threads": 1,
       "train.val_users": 100, "train.patience": 5, "train.mixed_negatives": 32, "model.hidden": [64],
       "model.dropout": 0.1}


@pytest.fixture()
def single_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_resume_is_bit_for_bit(tiny_ws, monkeypatch, single_thread):
    cfg = RunConfig.load(None, CFG)
    train(tiny_ws, cfg, run="straight", progress=False)
    monkeypatch.setenv("EBR_FAIL_AT_STEP", "13")
    with pytest.raises(InjectedFailure):
        train(tiny_ws, cfg, run="crashed", progress=False)
    crashed = torch.load(tiny_ws.run_dir("crashed") / "checkpoints" / "last.pt", weights_only=True)
    assert crashed["step"] == 10  # the last checkpoint before the failure
    monkeypatch.delenv("EBR_FAIL_AT_STEP")
    summary = train(tiny_ws, cfg, run="crashed", resume=True, progress=False)
    a = torch.load(tiny_ws.run_dir("straight") / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tiny_ws.run_dir("crashed") / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == summary["steps"] > 13
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("A", "B"):
        assert torch.equal(a["estimator"][k], b["estimator"][k])
    assert a["best"] > 0  # validation recall of a trained model


def test_resume_without_checkpoint_is_a_clear_error(tiny_ws):
    from ebr.errors import EbrError

    with pytest.raises(EbrError, match="no checkpoint"):
        train(tiny_ws, RunConfig(), run="never-started", resume=True, progress=False)
