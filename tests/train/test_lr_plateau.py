"""train.lr_plateau_factor: the learning rate decays at an epoch's end without a better validation
recall; the refit repeats the decays made before the selected step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebr.config import RunConfig
from ebr.train import loop
from tests.conftest import crash_at
from tests.data.test_given_split import _adjacency

OVER = {"train.batch_size": 128, "model.hidden": [16], "train.epochs": 6, "train.patience": 2,
        "train.stop_after_steps": 0, "train.first_epoch_checks": 0, "train.lr": 1e-3,
        "train.lr_plateau_factor": 0.5, "train.choose_pin_id": False, "train.choose_regularised": False}
SCRIPT = [0.5, 0.4, 0.6, 0.55, 0.5]  # validation recall at each epoch's end


def _lr(path) -> float:
    return torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["lr"]


def _scripted(monkeypatch):
    script = iter(SCRIPT)
    monkeypatch.setattr(loop, "validation_recalls", lambda *a, **k: np.array([next(script)]))


def test_rate_decays_after_an_epoch_without_improvement_and_the_refit_repeats_earlier_decays(tmp_path, monkeypatch):
    """Scripted validation 0.5, 0.4, 0.6, 0.55, 0.5 with patience 2: the rate halves after epochs 2
    and 4 (no better recall, training goes on), not after epoch 5 (which stops the run), and not
    after an improving epoch; the selected step is epoch 3's, so the refit halves once, after the
    step where selection did. Catches the decay on an improving epoch or on the stopping one, a
    decay not applied to the optimiser, the refit replaying none or one step late."""
    ws = _adjacency(tmp_path)
    _scripted(monkeypatch)
    s = loop.train(ws, RunConfig.load(None, OVER), run="plateau", progress=False)
    pe = -(-s["train_examples"] // 128)
    ck = ws.run_dir("plateau") / "checkpoints"
    assert s["epochs"] == 5 and s["selected_step"] == 3 * pe
    assert s["lr_drops"] == [2 * pe, 4 * pe]
    assert _lr(ck / "last.pt") == pytest.approx(1e-3 * 0.25)
    assert s["refit"]["lr_drops"] == [2 * pe] and s["refit"]["steps"] == 3 * pe
    assert _lr(ck / "refit_last.pt") == pytest.approx(1e-3 * 0.5)


def test_a_resumed_run_keeps_its_decays(tmp_path, monkeypatch):
    """A run that fails after its first decay and is resumed ends with the same decays, rate and
    refit as the uninterrupted run. Catches the decay steps not saved in (or not read from) the
    'last' checkpoint: the resumed refit would not repeat the first decay."""
    ws = _adjacency(tmp_path)
    _scripted(monkeypatch)
    full = loop.train(ws, RunConfig.load(None, OVER), run="whole", progress=False)
    pe = -(-full["train_examples"] // 128)
    _scripted(monkeypatch)
    crash_at(ws, RunConfig.load(None, OVER), "cut", 2 * pe + 2, monkeypatch)
    script = iter(SCRIPT[2:])  # the resumed run validates from epoch 3 on
    monkeypatch.setattr(loop, "validation_recalls", lambda *a, **k: np.array([next(script)]))
    cut = loop.train(ws, RunConfig.load(None, OVER), run="cut", resume=True, progress=False)
    assert cut["lr_drops"] == full["lr_drops"] and cut["refit"]["lr_drops"] == full["refit"]["lr_drops"] == [2 * pe]
    assert _lr(ws.run_dir("cut") / "checkpoints" / "refit_last.pt") == pytest.approx(1e-3 * 0.5)


def test_no_decay_before_stop_after_steps(tmp_path, monkeypatch):
    """Before train.stop_after_steps a dip in validation is no plateau (on data without time recall
    sits flat for epochs before it climbs): the same script with the guard beyond the run's length
    trains every epoch at the starting rate. Catches the guard dropped from the decay."""
    ws = _adjacency(tmp_path)
    script = iter(SCRIPT + [0.45])
    monkeypatch.setattr(loop, "validation_recalls", lambda *a, **k: np.array([next(script)]))
    s = loop.train(ws, RunConfig.load(None, {**OVER, "train.stop_after_steps": 10**6, "train.refit": False}),
                   run="guarded", progress=False)
    assert s["epochs"] == 6 and "lr_drops" not in s
    assert _lr(ws.run_dir("guarded") / "checkpoints" / "last.pt") == pytest.approx(1e-3)
