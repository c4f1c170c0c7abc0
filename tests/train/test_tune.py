"""`ebr tune`: an Optuna study on validation recall, persisted and resumable, whose best config
trains as is."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

from ebr.config import RunConfig
from ebr.errors import EbrError
from ebr.train.tune import load_space, tune

SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
         "model.temperature": {"type": "categorical", "choices": [0.05, 0.1]}}


def test_study_resumes_and_best_config_is_the_best_trial(tiny_ws):
    """Each trial's value is that run's best validation recall (the objective reads validation and
    nothing else); a second call adds trials to the stored study; best.yaml holds the best trial's
    params on top of the base config. Mutations caught: the study not persisted (a second call would
    start from zero), the best config written from the last instead of the best trial, the refit
    left on in trials (its recall is not a validation number), a base --set dropped, the per-dataset
    choices left on in trials (or dropped from best.yaml)."""
    base = RunConfig.load(None, {"train.max_steps": 3, "train.epochs": 1, "model.hidden": [16],
                                 "train.batch_size": 64})
    first = tune(tiny_ws, base, 2, name="t", space=SPACE, progress=False)
    again = tune(tiny_ws, base, 2, name="t", space=SPACE, progress=False)
    assert len(first["trials"]) == 2 and len(again["trials"]) == 4
    done = [t for t in again["trials"] if t["state"] == "COMPLETE"]
    assert len(done) >= 3  # the pruner spares the first three (n_startup_trials); a fourth may be pruned
    for t in done:
        summary = json.loads((tiny_ws.run_dir(f"tune-t-{t['number']}") / "summary.json").read_text())
        assert t["value"] == summary["best_val_recall@100"] and summary["served"] == "best.pt"
        assert "choice" not in summary  # a trial is its params, not the best of 4 selections
    best = max(done, key=lambda t: t["value"])
    cfg = RunConfig.load(again["best_config"])
    assert cfg.train.lr == best["params"]["train.lr"] and cfg.model.temperature == best["params"]["model.temperature"]
    assert cfg.train.batch_size == 64 and cfg.train.refit, "the base config, with the refit back on"
    assert cfg.train.choose_pin_id and cfg.train.choose_recency_days == [7.0], "and the base's choices"
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{again['storage']}")
    assert len(study.trials) == 4


def test_bad_spaces_are_one_line_errors(tmp_path):
    """Mutation caught: a typo in a field name accepted (the trial would silently tune nothing)."""
    bad = tmp_path / "space.yaml"
    for text in ("train.lrr: {type: float, low: 0.1, high: 1}", "train.lr: {type: normal}", "[1, 2]",
                 "model.crossing: {type: categorical}"):
        bad.write_text(text)
        with pytest.raises(EbrError):
            load_space(bad)
    r = subprocess.run([sys.executable, "-m", "ebr.cli", "--workspace", str(tmp_path / "w"), "tune", "--space",
                        str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "space" in r.stderr
