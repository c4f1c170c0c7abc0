"""Shared helpers for benchmarks: machine description, child-process peak RSS, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from ebr.workspace import library_versions

    return {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            **library_versions()}


def run_child(code: str, env: dict | None = None) -> dict:
    """Run Python code in a fresh process; returns its JSON stdout plus wall seconds and peak RSS."""
    t0 = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t0, 2)
    # ru_maxrss of children is the max over all children so far: run the biggest last, or alone
    res["peak_rss_gib"] = round(max(peak_kib, before) / 2**20, 3)
    return res


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    print(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def train_eval(ws, run: str, over: dict, out: Path, split: str | None = None, **eval_kw) -> dict:
    """One benchmark cell, resumable: the eval JSON at `out` if it exists; else train `run` with the
    overrides (reusing a finished run of the same name whose saved config is identical) and evaluate
    it (ebr.eval.evaluate keyword arguments), keeping the training summary under "train"."""
    import yaml

    from ebr.config import RunConfig
    from ebr.eval.evaluate import evaluate
    from ebr.train.loop import train

    if out.exists():
        return json.loads(out.read_text())
    cfg = RunConfig.load(None, over)
    rdir = ws.run_dir(run)
    done = rdir / "summary.json"
    same = (done.exists() and (rdir / "config.yaml").exists()
            and RunConfig.model_validate(yaml.safe_load((rdir / "config.yaml").read_text())) == cfg)
    s = json.loads(done.read_text()) if same else train(ws, cfg, run=run, progress=False)
    res = evaluate(ws, run, split, progress=False, **eval_kw)
    res["train"] = s
    out.write_text(json.dumps(res))
    return res
