"""Shared helpers for benchmarks: machine description, child-process peak RSS, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from ebr.config import NO_CHOICE

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
    overrides on top of NO_CHOICE (reusing a finished run of the same name whose saved config is identical) and evaluate
    it (ebr.eval.evaluate keyword arguments), keeping the training summary under "train"."""
    import yaml

    from ebr.config import RunConfig
    from ebr.eval.evaluate import evaluate
    from ebr.train.loop import train

    if out.exists():
        return json.loads(out.read_text())
    cfg = RunConfig.load(None, {**NO_CHOICE, **over})
    rdir = ws.run_dir(run)
    done = rdir / "summary.json"
    same = (done.exists() and (rdir / "config.yaml").exists()
            and RunConfig.model_validate(yaml.safe_load((rdir / "config.yaml").read_text())) == cfg)
    s = json.loads(done.read_text()) if same else train(ws, cfg, run=run, progress=False)
    res = evaluate(ws, run, split, progress=False, **eval_kw)
    res["train"] = s
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out)  # a killed benchmark leaves no half-written cell to be read back as done
    return res


def seeded_parser(doc: str, variants, root: str) -> argparse.ArgumentParser:
    """The flags every seeded variant benchmark takes: --datasets, --seeds, --variants, --refit,
    --set KEY=VALUE (repeatable; read them with `overrides`), --root."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="synth_small,ml100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(variants))
    ap.add_argument("--refit", action="store_true", help="refit on training + validation (the default pipeline)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every variant (YAML value), e.g. train.patience=1")
    ap.add_argument("--root", default=root)
    return ap


def overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs -> {KEY: YAML value}."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in pairs)}


def mean_std(x) -> dict:
    """{"mean", "std"}: the sample std (ddof 1) over seeds, 0 for one seed."""
    import numpy as np

    return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0}
