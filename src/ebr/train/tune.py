"""`ebr tune`: hyperparameter search on validation recall with Optuna (TPE sampler, median pruning
on the validation recall of each epoch).

The objective is a training run's best validation recall@100 (the selection phase of `ebr train`,
without the refit): the test part is never read. The study lives in WORKSPACE/tune/NAME/study.db
(SQLite), so a second `ebr tune --name NAME` adds trials to it; best.yaml is the best trial's
full run config, ready for `ebr train --config`.

A search space is a YAML mapping of dotted config fields to distributions:

    train.lr: {type: float, low: 1.0e-4, high: 5.0e-3, log: true}
    model.crossing: {type: categorical, choices: [mlp, masknet]}
    features.history_len: {type: int, low: 10, high: 100, step: 10}
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from ebr.config import NO_CHOICE, RunConfig
from ebr.errors import EbrError
from ebr.log import log
from ebr.workspace import Workspace, check_name, write_json

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 5e-3, "log": True},
    "model.temperature": {"type": "float", "low": 0.03, "high": 0.15, "log": True},
    "model.dim": {"type": "categorical", "choices": [32, 64, 128]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "train.weight_decay": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
    "features.history_len": {"type": "categorical", "choices": [20, 50, 100]},
    "model.crossing": {"type": "categorical", "choices": ["mlp", "masknet", "dhen"]},
    "model.use_pin_id": {"type": "categorical", "choices": [True, False]},
    "train.logq": {"type": "categorical", "choices": [True, False]},
}


def load_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The default space, or a YAML file's (checked: every field exists in the run config)."""
    if path is None:
        return DEFAULT_SPACE
    try:
        space = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EbrError(f"--space {path}: cannot read it as YAML ({type(e).__name__})") from None
    if not isinstance(space, dict) or not space:
        raise EbrError(f"--space {path}: expected a mapping of config fields to distributions")
    for key, dist in space.items():
        if not isinstance(dist, dict) or dist.get("type") not in ("float", "int", "categorical"):
            raise EbrError(f"--space {path}: {key}: needs type float, int or categorical")
        if dist["type"] == "categorical" and not dist.get("choices"):
            raise EbrError(f"--space {path}: {key}: a categorical needs choices")
        if dist["type"] != "categorical" and not ("low" in dist and "high" in dist):
            raise EbrError(f"--space {path}: {key}: needs low and high")
        RunConfig.load(None, {key: dist["choices"][0] if dist["type"] == "categorical" else dist["low"]})
    return space


def _suggest(trial, key: str, d: dict[str, Any]):
    if d["type"] == "float":
        return trial.suggest_float(key, float(d["low"]), float(d["high"]), log=bool(d.get("log", False)))
    if d["type"] == "int":
        return trial.suggest_int(key, int(d["low"]), int(d["high"]), step=int(d.get("step", 1)),
                                 log=bool(d.get("log", False)))
    return trial.suggest_categorical(key, list(d["choices"]))


def tune(ws: Workspace, base: RunConfig, trials: int, name: str = "main", space: dict | None = None,
         seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run `trials` more trials of the study `name`; returns its summary (best value, params, the
    best config's path, every trial)."""
    import optuna

    from ebr.train.loop import train

    check_name(name, "study")
    space = space or DEFAULT_SPACE
    folder = ws.root / "tune" / name
    folder.mkdir(parents=True, exist_ok=True)
    base_dump = base.model_dump()
    base_dump["train"]["refit"] = False  # the objective is validation recall: the refit would read it

    def objective(trial: optuna.Trial) -> float:
        over = {k: _suggest(trial, k, d) for k, d in space.items()}
        # each trial is its config as given (NO_CHOICE): the per-dataset choices would train 2-4
        # selections per trial and report the best under one set of params (best.yaml keeps them)
        cfg = RunConfig.load(None, {**_flatten(base_dump), **NO_CHOICE, **over})
        run = f"tune-{name}-{trial.number}"

        def on_epoch(epoch: int, recall: float) -> None:
            trial.report(recall, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation recall {recall:.4f} after epoch {epoch}")

        try:
            summary = train(ws, cfg, run=run, progress=False, on_epoch=on_epoch)
        finally:  # keep the metrics and config of every trial, not its checkpoints
            shutil.rmtree(ws.run_dir(run) / "checkpoints", ignore_errors=True)
        if progress:
            log.info("trial %d: val recall@100 %.4f  %s", trial.number, summary["best_val_recall@100"], over)
        return float(summary["best_val_recall@100"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'study.db'}"
    try:  # a resumed study's sampler seed moves on, so its random start-up trials are new ones
        done = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:
        done = 0
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed + done),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    study.optimize(objective, n_trials=trials, catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise EbrError(f"study {name!r}: no trial completed (all pruned or failed); run more trials")
    best = study.best_trial
    best_cfg = RunConfig.load(None, {**_flatten(base.model_dump()), **best.params})
    (folder / "best.yaml").write_text(best_cfg.to_yaml())
    out = {
        "study": name, "storage": str(folder / "study.db"), "best_value": best.value, "best_trial": best.number,
        "best_params": best.params, "best_config": str(folder / "best.yaml"),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                   for t in study.trials],
    }
    write_json(folder / "summary.json", out)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        nested = isinstance(v, dict) and k not in _DICT_FIELDS
        out.update(_flatten(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": v})
    return out


_DICT_FIELDS = {"action_weights"}  # config fields whose value is itself a mapping
