"""Shared fixtures: generated worlds are session-scoped (seconds), MovieLens read from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ebr.config import NO_CHOICE
from ebr.workspace import Workspace

ML100K = Path(os.environ.get("EBR_ML100K", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"))


def require_ml100k() -> Path:
    """The ML-100K folder; skip with a message when absent, but fail under CI=true."""
    if (ML100K / "u.data").exists():
        return ML100K
    msg = f"MovieLens 100K not found at {ML100K} (set EBR_ML100K or place ../shared/data/ml-100k)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def tiny_ws(tmp_path_factory) -> Workspace:
    from ebr.data.synth import generate

    ws = Workspace.at(tmp_path_factory.mktemp("tiny"))
    generate(ws, "tiny", seed=0, progress=False)
    return ws


@pytest.fixture(scope="session")
def llo_ws(tmp_path_factory) -> Workspace:
    """The tiny world with a leave-last-out split (each user's next engagement is the target)."""
    from ebr.data.splits import make_leave_last_out
    from ebr.data.synth import generate

    ws = Workspace.at(tmp_path_factory.mktemp("llo"))
    generate(ws, "tiny", seed=0, progress=False)
    make_leave_last_out(ws)
    return ws


@pytest.fixture(scope="session")
def small_ws(tmp_path_factory) -> Workspace:
    from ebr.data.synth import generate

    ws = Workspace.at(tmp_path_factory.mktemp("small"))
    generate(ws, "small", seed=0, progress=False)
    return ws


@pytest.fixture(scope="session")
def ml100k_ws(tmp_path_factory) -> Workspace:
    from ebr.data.importers import import_movielens

    path = require_ml100k()
    ws = Workspace.at(tmp_path_factory.mktemp("ml100k"))
    import_movielens(ws, path)
    return ws


@pytest.fixture(scope="session")
def multi_tiny(tiny_ws):
    """A capsule (multi-embedding) model on the tiny world and its exact bundle on the temporal split."""
    from ebr.config import RunConfig
    from ebr.index.bundle import build_bundle
    from ebr.train.loop import train

    cfg = RunConfig.load(None, {"train.epochs": 2, "train.batch_size": 256, "model.hidden": [64],
                                "model.user_embeddings": "capsule", **NO_CHOICE})
    train(tiny_ws, cfg, run="multi", progress=False)
    return tiny_ws, build_bundle(tiny_ws, "multi", "temporal")


@pytest.fixture(scope="session")
def cond_tiny(tiny_ws):
    """A conditional model (model.conditional) on the tiny world and its exact bundle on the
    temporal split."""
    from ebr.config import RunConfig
    from ebr.index.bundle import build_bundle
    from ebr.train.loop import train

    cfg = RunConfig.load(None, {"train.epochs": 2, "train.batch_size": 256, "model.hidden": [64],
                                "model.conditional": True, **NO_CHOICE})
    train(tiny_ws, cfg, run="cond", progress=False)
    return tiny_ws, build_bundle(tiny_ws, "cond", "temporal")


def crash_at(ws: Workspace, cfg, run: str, step: int, monkeypatch, phase: str = "select") -> Path:
    """Train `run` until the failure injected at `step` of `phase` (EBR_FAIL_AT_STEP,
    EBR_FAIL_PHASE), as a killed process stops; the environment is left as it was. Returns the
    run's last.pt."""
    from ebr.train.loop import InjectedFailure, train

    with monkeypatch.context() as m:
        m.setenv("EBR_FAIL_AT_STEP", str(step))
        m.setenv("EBR_FAIL_PHASE", phase)
        with pytest.raises(InjectedFailure):
            train(ws, cfg, run=run, progress=False)
    return ws.run_dir(run) / "checkpoints" / "last.pt"
