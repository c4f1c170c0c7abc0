"""What a new user meets first: declared dependencies, quiet logs off a terminal, --version,
bundles resolved in the workspace, and --json output that is only JSON."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ebr.config import RunConfig
from ebr.index.bundle import build_bundle
from ebr.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "faiss": "faiss-cpu", "prometheus_client": "prometheus-client", "sklearn": "scikit-learn"}


def test_pyproject_declares_every_runtime_import():
    """Every third-party module imported under src/ is a declared dependency (or in an extra), or
    pinned in requirements-torchrec.lock.txt (torchrec: its metadata pulls the CUDA fbgemm-gpu, so
    the Makefile installs it from that file with --no-deps, ENV.md). Mutation caught: dropping
    fastapi/scipy/... from pyproject (they were missing before)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    by_hand = [ln for ln in (ROOT / "requirements-torchrec.lock.txt").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    declared = {d.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()
                for d in meta["dependencies"] + [x for v in meta["optional-dependencies"].values() for x in v]
                + by_hand}
    stdlib = set(sys.stdlib_module_names)
    used = set()
    for f in (ROOT / "src" / "ebr").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module.split(".")[0])
    third = {m for m in used if m not in stdlib and m not in {"ebr", "__future__"}}
    missing = sorted(m for m in third if DIST.get(m, m).lower().replace("_", "-") not in
                     {d.replace("_", "-") for d in declared})
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "torch==2.13.0" in meta["dependencies"]


def _ebr(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebr.cli", *args], capture_output=True, text=True, **kw)


def test_cli_version_quiet_progress_latest_bundle_and_json(tiny_ws, tmp_path):
    """Mutations caught: progress bars written when stderr is not a terminal (CI logs filled with
    refreshes), serve/retrieve ignoring --workspace, log lines mixed into --json stdout."""
    v = _ebr("--version")
    assert v.returncode == 0 and v.stdout.startswith("ebr ")
    out = _ebr("data", "synth", "--preset", "tiny", "--workspace", str(tmp_path / "w"))
    assert out.returncode == 0 and "\r" not in out.stderr and "it/s" not in out.stderr and "user/s" not in out.stderr
    assert "rows in = accepted + quarantined" in out.stderr  # the import summary is logged
    quiet = _ebr("--quiet", "data", "synth", "--preset", "tiny", "--workspace", str(tmp_path / "w"))
    assert quiet.returncode == 0 and quiet.stderr == ""
    sql = _ebr("data", "sql", "SELECT count(*) AS n FROM pins", "--json", "--workspace", str(tmp_path / "w"))
    assert json.loads(sql.stdout)[0]["n"] > 0
    train(tiny_ws, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [16]}), run="cli", progress=False)
    bundle = build_bundle(tiny_ws, "cli", "latest")
    users = tmp_path / "users.txt"
    users.write_text("\n".join(["nobody"]))
    for ref in ("latest", bundle.name):
        r = _ebr("retrieve", "--workspace", str(tiny_ws.root), "--bundle", ref, "--users", str(users), "--k", "5",
                 "--json", str(tmp_path / "o.json"))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "o.json").read_text())["version"] == tiny_ws.latest("bundles").name


def test_demo_passes_no_choose_no_refit_and_set_to_training(tmp_path, monkeypatch):
    """`ebr demo --no-choose --no-refit --set ...` trains the config those flags make (stopped at the
    training call: the rest of the demo is the stages' own tests). Mutations caught: demo building
    its config from --epochs alone (the earlier code: every flag silently ignored), --no-choose
    dropped from the demo's parser."""
    from ebr import cli
    from ebr.config import NO_CHOICE

    class Stop(Exception):
        pass

    seen = {}

    def fake_train(ws, cfg, run="main", **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr("ebr.train.loop.train", fake_train)
    with pytest.raises(Stop):
        cli.main(["demo", "--workspace", str(tmp_path / "ws"), "--preset", "tiny", "--no-choose", "--no-refit",
                  "--set", "train.lr=0.001", "--epochs", "2"])
    t = seen["cfg"].train
    assert (t.refit, t.lr, t.epochs) == (False, 0.001, 2)
    for key, value in NO_CHOICE.items():
        section, name = key.split(".")
        assert getattr(getattr(seen["cfg"], section), name) == value, key
    # the demo bundles and evaluates its own temporal split: another split is refused, not ignored
    assert cli.main(["demo", "--workspace", str(tmp_path / "ws"), "--preset", "tiny", "--set", "data.split=other"]) == 2
