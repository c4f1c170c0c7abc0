"""Wrong invocations a new user makes: one line that says what to fix, exit code 2, no traceback.

Mutation caught: any of these paths raising a plain exception (a traceback, exit 1) instead of an
EbrError; --debug not re-raising.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebr.cli import main
from ebr.config import NO_CHOICE, RunConfig
from ebr.train.loop import train
from ebr.workspace import Workspace, folder_lock


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A tiny world in a folder whose name holds a quote (SQL built by interpolation broke on it)."""
    from ebr.data.synth import generate

    w = Workspace.at(tmp_path_factory.mktemp("ws") / "it's here")
    generate(w, "tiny", seed=0, progress=False)
    train(w, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [16], **NO_CHOICE}), run="ok", progress=False)
    return w


def _cases(ws: Workspace, tmp: Path) -> list[tuple[list[str], str]]:
    W = ["--workspace", str(ws.root)]
    empty = tmp / "empty.csv"
    empty.write_text("")
    (tmp / "bad.yaml").write_text("train: {epochs: [}")
    (tmp / "typo.yaml").write_text("train:\n  epochz: 3\n")
    return [
        (["eval", *W, "--run", "never-trained"], "train it first"),
        (["index", "build", *W, "--run", "never-trained"], "train it first"),
        (["train", *W, "--config", str(tmp / "missing.yaml")], "missing.yaml"),
        (["train", *W, "--config", str(tmp / "bad.yaml")], "bad.yaml"),
        (["train", *W, "--config", str(tmp / "typo.yaml")], "train.epochz"),
        (["train", *W, "--set", "train.epochz=3"], "train.epochz"),
        (["train", *W, "--set", "train.epochs"], "KEY=VALUE"),
        (["train", *W, "--set", "train.epochs=many"], "train.epochs"),
        (["train", *W, "--run", "../../escape"], "invalid run name"),
        (["train", *W, "--run", "nothing-here", "--resume"], "no checkpoint"),
        (["corpus", "build", *W, "--action-weights", "save=abc"], "save=abc"),
        (["corpus", "build", *W, "--action-weights", "teleport=2"], "teleport"),
        (["data", "sql", *W, "SELEC * FROM pins"], "SQL"),
        (["data", "import", "interactions", str(empty), *W, "--source", "e"], "empty file"),
        (["data", "import", "interactions", str(tmp / "nope.csv"), *W], "not found"),
        (["data", "split", "temporal", *W, "--test-fraction", "1.5"], "test-fraction"),
        (["eval", *W, "--run", "ok", "--peers", "popularity,alz"], "alz"),
        (["eval", *W, "--run", "ok", "--split", "nosuch"], "nosuch"),
        (["retrieve", *W, "--bundle", str(tmp / "no-bundle"), "--users", str(empty), "--json", str(tmp / "o.json")],
         "not a bundle folder"),
        (["serve", str(tmp / "no-bundle")], "not a bundle folder"),
        (["index", "check", str(tmp / "no-bundle")], "not a bundle folder"),
    ]


def test_wrong_invocations_are_one_line_errors(ws, tmp_path, capsys):
    cases = _cases(ws, tmp_path)
    assert len(cases) >= 15
    for argv, fragment in cases:
        code = main(argv)
        captured = capsys.readouterr()
        err = captured.err + captured.out
        assert code == (1 if argv[:2] == ["index", "check"] else 2), (argv, code, err)  # check: 1 = problems found
        assert fragment in err and "Traceback" not in err, (argv, err)


def test_locked_run_truncated_checkpoint_and_resume_settings(ws, capsys):
    with folder_lock(ws.run_dir("ok"), "run 'ok'"):
        assert main(["train", "--workspace", str(ws.root), "--run", "ok"]) == 2
        assert "in use by another process" in capsys.readouterr().err
    last = ws.run_dir("ok") / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    try:
        assert main(["train", "--workspace", str(ws.root), "--run", "ok", "--resume"]) == 2
        assert "truncated or corrupt" in capsys.readouterr().err
    finally:
        last.write_bytes(data)
    assert main(["train", "--workspace", str(ws.root), "--run", "ok", "--resume", "--set", "train.lr=0.5"]) == 0
    assert "ignored: train.lr (given 0.5, checkpoint 0.002)" in capsys.readouterr().err


def test_debug_shows_the_traceback(ws):
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "ebr.cli", "--debug", "eval", "--workspace", str(ws.root), "--run",
                          "never-trained"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr
