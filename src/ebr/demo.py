"""`ebr demo`: every built stage on the synthetic world, ending in a results table and a report."""

from __future__ import annotations

import time

from ebr.log import log
from ebr.workspace import Workspace


def cmd_demo(a) -> int:
    from ebr.cli import _overrides
    from ebr.config import RunConfig
    from ebr.corpus.build import build_serving_corpus, corpus_coverage
    from ebr.data.splits import make_temporal
    from ebr.data.synth import generate
    from ebr.data.tables import stats
    from ebr.eval.evaluate import evaluate, format_table, write_report
    from ebr.index.bundle import build_bundle
    from ebr.train.loop import train

    ws = Workspace.at(a.workspace)
    t0 = time.time()

    def step(i: int, msg: str) -> None:
        log.info("[%d/6] %s  (%.0fs)", i, msg, time.time() - t0)

    step(1, f"synthetic world ({a.preset}) -> {ws.root}/tables")
    generate(ws, a.preset, seed=0)
    split = make_temporal(ws)
    s = stats(ws)
    log.info(f"  {s['engagements']:,} engagements, {s['pins']:,} pins ({s['coarse_signatures']:,} image signatures), "
             f"{s['users']:,} users, {s['interests']} interests; split temporal: "
             + ", ".join(f"{k} {v:,}" for k, v in split.manifest["counts"].items()))
    step(2, "train the two-tower model (runs/main)")
    over = _overrides(a)
    if "data.split" in over:
        from ebr.errors import EbrError

        raise EbrError("ebr demo trains, bundles and evaluates its own temporal split: leave data.split unset "
                       "(ebr train --split NAME for another)")
    cfg = RunConfig.load(a.config, over)
    summary = train(ws, cfg, run="main")
    step(3, "bundle of the best checkpoint as of the split's cut (for evaluation)")
    bundle = build_bundle(ws, "main", split.name)
    step(4, "evaluate against popularity, interest-popular and ALS")
    res = evaluate(ws, "main", split.name, progress=False)
    report = write_report(ws, res, "main", "demo")
    step(5, "serving corpus as of the cut (decayed vs raw sum), and evaluation against it")
    n = max(1000, s["pins"] // 4)
    cov = {}
    for decay in (True, False):
        cdir = build_serving_corpus(ws, top_n=n, decay=decay)
        cov[decay] = corpus_coverage(ws, cdir.name)
    cdir = build_serving_corpus(ws, top_n=n)  # the decayed one, latest
    res_corpus = evaluate(ws, "main", split.name, corpus=cdir.name, progress=False)
    step(6, "HNSW serving bundle over the latest data")
    serving = build_bundle(ws, "main", "latest", backend="hnsw")
    print("\nebr demo: results (warm users, all pins as candidates)")
    print(format_table(res))
    print(f"\nserving corpus: top {n:,} coarse signatures; next-7-day positive coverage "
          f"{cov[True]['coverage']:.1%} time-decayed vs {cov[False]['coverage']:.1%} raw sum")
    print(f"candidates restricted to the corpus ({res_corpus['candidates']}):")
    print(format_table(res_corpus))
    print(f"\nbest validation recall@100 {summary['best_val_recall@100']:.4f} after {summary['steps']:,} steps"
          f" ({summary['train_seconds']:.0f}s)")
    print(f"report:         {report / 'report.md'}")
    print(f"eval bundle:    {bundle}")
    print(f"serving bundle: {serving}")
    print(f"done in {time.time() - t0:.0f}s. Serve it:\n  .venv/bin/ebr serve {serving} --port 8000")
    return 0
