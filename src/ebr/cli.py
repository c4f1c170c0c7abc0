"""The `ebr` command: a thin layer over the stage packages. Every command takes --workspace."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from ebr.log import log
from ebr.workspace import Workspace, write_json

FLOW = """\
data flow (each stage writes under the workspace, with a manifest.json):
  ebr data     import | synth | split | sql | stats   validated Parquet tables (+ quarantine)
  ebr corpus   serving corpus: dedup by image signature, time-decayed, top N (DuckDB | Spark)
  ebr pretrain-ids  user and pin ID tables, contrastive, on TorchRec (older window)
  ebr train    two-tower model: logQ sampled softmax, checkpoints, resume
  ebr index    bundle: exported user tower + pin embeddings + ANN index (exact | hnsw | ivfpq)
  ebr retrieve batch candidate generation through a bundle
  ebr serve    POST /v1/retrieve over a bundle (FastAPI + uvicorn, hot reload)
  ebr explore  the service + a web page of one user's history, clusters and candidates
  ebr eval     offline metrics against peers through the serving Retriever
  ebr demo     every built stage on the synthetic world
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ebr")
    except PackageNotFoundError:
        return "unknown"


class _Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _ws_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workspace", "-w", default="./workspace", help="workspace folder (created if missing)")
    return p


def _add(sub, name: str, help: str, description: str, fn: Callable, parents=()) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=textwrap.dedent(description), formatter_class=_Fmt,
                       parents=[_ws_parent(), *parents])
    p.set_defaults(fn=fn)
    return p


def _ts(value: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO-8601 time, e.g. 2026-04-01T00:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# ---- data ---------------------------------------------------------------------------------------
def cmd_import_movielens(a) -> int:
    from ebr.data.importers import import_movielens

    import_movielens(Workspace.at(a.workspace), Path(a.path), source=a.source, strict=a.strict)
    return 0


def cmd_import_interactions(a) -> int:
    from ebr.data.importers import import_adjacency, import_interactions
    from ebr.data.validate import DataError

    ws = Workspace.at(a.workspace)
    if a.format == "adjacency":
        if not (a.train and a.test):
            raise DataError("--format adjacency needs --train FILE and --test FILE (lines: 'user item item ...')")
        e = import_adjacency(
            ws, Path(a.train), Path(a.test), source=a.source or "adjacency", split=a.split, strict=a.strict
        )
        sp = e["split"]
        log.info(f"split {sp['name']!r}: {sp['train']:,} train pairs, {sp['test']:,} test pairs")
    else:
        if not a.file:
            raise DataError("give the interactions FILE (CSV or Parquet with user_id, item_id[, ts][, weight])")
        import_interactions(
            ws, Path(a.file), source=a.source or "interactions", strict=a.strict, max_future_days=a.max_future_days
        )
    return 0


def cmd_synth(a) -> int:
    from ebr.data.synth import generate

    e = generate(Workspace.at(a.workspace), a.preset, seed=a.seed)
    n = e["tables"]["engagements"]["accepted"]
    log.info(f"synth {a.preset} seed={a.seed}: {n:,} engagements in {e['wall_seconds']:.1f}s "
             f"({n / max(e['wall_seconds'], 1e-9):,.0f}/s)")
    return 0


def cmd_sql(a) -> int:
    import duckdb

    from ebr.data.tables import connect
    from ebr.errors import EbrError

    try:
        rel = connect(Workspace.at(a.workspace)).sql(a.query)
    except duckdb.Error as e:
        raise EbrError(f"SQL error: {str(e).splitlines()[0]} (tables: engagements, pins, users, interests)") from None
    if rel is None:
        return 0
    if a.json:
        cols = rel.columns
        rows = [dict(zip(cols, r)) for r in rel.fetchall()]
        print(json.dumps(rows, default=str))
    else:
        rel.show(max_rows=a.max_rows)
    return 0


def cmd_stats(a) -> int:
    from ebr.data.tables import stats

    print(json.dumps(stats(Workspace.at(a.workspace)), indent=2, default=str))
    return 0


def cmd_split(a) -> int:
    from ebr.data.splits import make_leave_last_out, make_temporal

    ws = Workspace.at(a.workspace)
    if a.kind == "temporal":
        s = make_temporal(
            ws, a.name or "temporal", cut=a.cut, test_fraction=a.test_fraction, val_fraction=a.val_fraction,
            min_val_users=a.min_val_users,
        )
    else:
        s = make_leave_last_out(ws, a.name or "leave_last_out")
    print(json.dumps(s.manifest, indent=2))
    return 0


# ---- corpus -------------------------------------------------------------------------------------
def cmd_corpus_build(a) -> int:
    from ebr.corpus.build import build_serving_corpus, parse_weights, read_json

    d = build_serving_corpus(
        Workspace.at(a.workspace),
        a.engine,
        a.as_of,
        a.window_days,
        a.half_life_days,
        not a.no_decay,
        a.top_n,
        parse_weights(a.action_weights),
    )
    m = read_json(d / "manifest.json")
    print(json.dumps({"corpus": str(d), "as_of": m["as_of"], "counts": m["counts"], "seconds": m["seconds"]}, indent=2))
    return 0


def cmd_corpus_eval(a) -> int:
    from ebr.corpus.build import corpus_coverage

    print(json.dumps(corpus_coverage(Workspace.at(a.workspace), a.version, a.horizon_days, a.engine), indent=2))
    return 0


# ---- train / index / retrieve / eval -------------------------------------------------------------
def _overrides(a) -> dict:
    out = {}
    for item in a.set or []:
        if "=" not in item:
            from ebr.errors import EbrError

            raise EbrError(f"--set expects KEY=VALUE (e.g. train.epochs=3), got {item!r}")
        k, v = item.split("=", 1)
        import yaml

        out[k] = yaml.safe_load(v)
    for flag, key in (("epochs", "train.epochs"), ("seed", "train.seed"), ("split", "data.split")):
        if getattr(a, flag, None) is not None:
            out[key] = getattr(a, flag)
    if getattr(a, "no_refit", False):
        out["train.refit"] = False
    if getattr(a, "no_choose", False):
        from ebr.config import NO_CHOICE

        out.update(NO_CHOICE)
    if getattr(a, "allow_overlap", False):
        out["train.allow_overlap"] = True
    return out


def cmd_train(a) -> int:
    from ebr.config import RunConfig
    from ebr.train.loop import train

    cfg = RunConfig.load(a.config, _overrides(a))
    s = train(Workspace.at(a.workspace), cfg, run=a.run, resume=a.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(s, indent=2))
    return 0


def cmd_pretrain_ids(a) -> int:
    from ebr.config import RunConfig
    from ebr.pretrain import snapshots

    ws = Workspace.at(a.workspace)
    if a.action == "list":
        snaps = snapshots.list_snapshots(ws)
        if a.json:
            print(json.dumps(snaps, indent=2))
        elif not snaps:
            print(f"no ID snapshots in {snapshots.root(ws)}: run `ebr pretrain-ids`")
        for m in [] if a.json else snaps:
            c = m["counts"]
            print(f"{m['name']}  dim {m['dim']}  {m['window_text']}  {c['examples']:,} examples, {c['users']:,} users, "
                  f"{c['pins']:,} pins  loss {m['loss_curve'][0]:.3f} -> {m['loss_curve'][-1]:.3f}  "
                  f"{m['content_hash'][:12]}")
        return 0
    from ebr.pretrain.ids import pretrain_ids

    over = _overrides(a)
    for flag in ("dim", "batch_size", "lr"):
        if getattr(a, flag) is not None:
            over[f"pretrain.{flag}"] = getattr(a, flag)
    if a.epochs is not None:  # pretraining's own epochs, not train.epochs
        over.pop("train.epochs", None)
        over["pretrain.epochs"] = a.epochs
    cfg = RunConfig.load(a.config, over)
    m = pretrain_ids(ws, cfg, window=a.window, name=a.run, resume=a.resume)
    if m:
        print(json.dumps({k: m[k] for k in ("name", "window_text", "dim", "counts", "loss_curve", "throughput",
                                            "content_hash")}, indent=2))
    return 0


def cmd_tune(a) -> int:
    from ebr.config import RunConfig
    from ebr.train.tune import load_space, tune

    if a.trials < 1:
        from ebr.errors import EbrError

        raise EbrError(f"--trials must be at least 1 (got {a.trials})")
    cfg = RunConfig.load(a.config, _overrides(a))
    out = tune(Workspace.at(a.workspace), cfg, a.trials, name=a.name, space=load_space(a.space), seed=a.seed or 0)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"study {out['study']}: best validation recall@100 {out['best_value']:.4f} (trial {out['best_trial']}, "
              f"{len(out['trials'])} trials in {out['storage']})")
        print(f"best config: {out['best_config']}  ->  ebr train --config {out['best_config']}")
    return 0


def cmd_index_build(a) -> int:
    from ebr.index.bundle import build_bundle

    path = build_bundle(Workspace.at(a.workspace), a.run, split=a.split, backend=a.backend, corpus=a.corpus)
    from ebr.workspace import read_json

    m = read_json(path / "manifest.json")
    print(
        json.dumps(
            {
                "bundle": str(path),
                "backend": a.backend,
                "candidates": m["counts"]["candidates"],
                "recall@100_vs_exact": m["index"]["recall@100_vs_exact"],
                "index_build_seconds": m["index"]["build_seconds"],
            },
            indent=2,
        )
    )
    return 0


def cmd_index_check(a) -> int:
    from ebr.index.verify import check_bundle

    m, problems = check_bundle(a.bundle, a.expect_version)
    if a.json:
        print(
            json.dumps(
                {"bundle": a.bundle, "version": (m or {}).get("version"), "ok": not problems, "problems": problems},
                indent=2,
            )
        )
    else:
        for p in problems:
            print(f"problem: {p}")
        print(f"{a.bundle}: {'OK, version ' + m['version'] if not problems and m else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_retrieve(a) -> int:
    from ebr.errors import EbrError
    from ebr.serve.retriever import Retriever

    r = Retriever(Workspace.at(a.workspace).resolve_bundle(a.bundle))
    try:
        users = [u.strip() for u in Path(a.users).read_text().splitlines() if u.strip()]
    except OSError as e:
        raise EbrError(f"--users {Path(a.users).name}: cannot read it ({e.strerror})") from None
    try:
        mode = r.resolve_mode(a.mode)
    except ValueError as e:
        raise EbrError(f"--mode {a.mode}: {e}") from None
    interests = [x.strip() for x in (a.interests or "").split(",") if x.strip()] or None
    try:
        results = r.retrieve_batch(users, a.k, mode, interests)
    except ValueError as e:
        raise EbrError(f"--interests: {e}") from None
    out = {
        u: {
            "items": [{"pin_id": p, "score": sc, "source": src} for p, sc, src in zip(x.pin_ids, x.scores, x.sources)],
            "cold_start": x.cold_start,
        }
        for u, x in zip(users, results)
    }
    write_json(Path(a.json), {"version": r.version, "k": a.k, "mode": mode, "users": out})
    log.info("%s users -> %s", f"{len(users):,}", a.json)
    return 0


def cmd_serve(a) -> int:
    from ebr.errors import EbrError
    from ebr.serve.app import serve

    if a.retrieval_threads < 1 or a.threads < 1:
        raise EbrError("--threads and --retrieval-threads must be at least 1")

    ws = Workspace.at(a.workspace)
    bundle = str(ws.resolve_bundle(a.bundle))
    if getattr(a, "explore", False):
        print(f"explorer: http://{a.host}:{a.port}/explore  (one user: /explore?user=ID)", flush=True)
    serve(bundle, a.host, a.port, a.max_k, a.timeout_ms, a.threads, a.expect_version, workspace=str(ws.root),
          retrieval_threads=a.retrieval_threads)
    return 0


def cmd_eval(a) -> int:
    from ebr.eval.evaluate import evaluate, write_report

    ws = Workspace.at(a.workspace)
    res = evaluate(
        ws,
        a.run,
        a.split,
        peers=tuple(p for p in a.peers.split(",") if p),
        candidates=Path(a.candidates) if a.candidates else None,
        corpus=a.corpus,
        bundle=Path(a.bundle) if a.bundle else None,
        conditional=True if a.conditional else None,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    d = write_report(ws, res, a.run, a.report)
    log.info(f"report: {d / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="ebr",
        description="ebr: embedding-based retrieval for recommendation feeds (Pinterest-style two towers).",
        epilog=FLOW + "\nRun `ebr COMMAND --help` for each command's options and examples.",
        formatter_class=_Fmt,
    )
    root.add_argument("--debug", action="store_true", help="show the traceback of an error")
    root.add_argument("--verbose", "-v", action="store_true", help="more log lines (stderr)")
    root.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only, no progress bars")
    root.add_argument("--version", action="version", version=f"ebr {_version()}")
    stages = root.add_subparsers(dest="stage", metavar="STAGE", required=True)

    data = stages.add_parser(
        "data",
        help="import, generate, split and query the tables",
        description="Validated Parquet tables: engagements, pins, users, interests.",
        formatter_class=_Fmt,
    )
    dsub = data.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    imp = dsub.add_parser(
        "import",
        help="import a real dataset",
        formatter_class=_Fmt,
        description="Import a dataset. Every row is validated: rows in = accepted + quarantined.",
    )
    isub = imp.add_subparsers(dest="kind", metavar="KIND", required=True)
    strict = argparse.ArgumentParser(add_help=False)
    strict.add_argument("--strict", action="store_true", help="fail (and write nothing) on any bad row")
    p = _add(
        isub,
        "movielens",
        "MovieLens 100K or 1M folder",
        """\
        Import MovieLens: ML-100K (u.data, u.item, u.user) or ML-1M (ratings.dat, movies.dat, users.dat).
        Ratings become engagements: 5 -> save, 4 -> click, 3 -> closeup, 1-2 -> hide.
        Genres become interests, demographics user features (age bucket, gender, occupation, zip3).

        example:  ebr data import movielens ../shared/data/ml-100k
        """,
        cmd_import_movielens,
        parents=[strict],
    )
    p.add_argument("path", help="folder holding the MovieLens files")
    p.add_argument("--source", default="movielens", help="source name; importing a source again replaces its rows")

    p = _add(
        isub,
        "interactions",
        "generic interactions (CSV/Parquet) or adjacency-list splits",
        """\
        Import interactions.
          csv/parquet: columns user_id, item_id, optional ts (unix seconds or ISO-8601), weight, action.
          adjacency:   --train F --test F, lines 'user item item ...' (no time); records a given split.

        examples:
          ebr data import interactions clicks.csv
          ebr data import interactions --format adjacency --train train.txt --test test.txt
        """,
        cmd_import_interactions,
        parents=[strict],
    )
    p.add_argument("file", nargs="?", help="CSV or Parquet file (not used with --format adjacency)")
    p.add_argument("--format", choices=["table", "adjacency"], default="table")
    p.add_argument("--train", help="adjacency training file")
    p.add_argument("--test", help="adjacency test file")
    p.add_argument("--split", default="given", help="name of the split recorded by an adjacency import")
    p.add_argument("--source", default=None, help="source name (default: interactions / adjacency)")
    p.add_argument(
        "--max-future-days",
        type=float,
        default=1.0,
        help="quarantine engagements later than the import time + this many days",
    )

    p = _add(
        dsub,
        "synth",
        "generate the synthetic homefeed world",
        """\
        Generate the synthetic homefeed world (SYNTH.md) as source 'synth', streamed to Parquet
        chunk by chunk (memory bounded by the chunk). Latent variables go to truth/ (diagnostics).
        Presets: tiny (tests, ~13k engagements), small (demo, ~1M), large (benchmarks, ~100M).

        example:  ebr data synth --preset small --seed 0
        """,
        cmd_synth,
    )
    p.add_argument("--preset", choices=["tiny", "small", "large"], default="small")
    p.add_argument("--seed", type=int, default=0)

    p = _add(
        dsub,
        "sql",
        "run DuckDB SQL over the tables",
        """\
        Run a DuckDB query over views named engagements, pins, users, interests.

        example:  ebr data sql "SELECT action, count(*) FROM engagements GROUP BY 1" --json
        """,
        cmd_sql,
    )
    p.add_argument("query")
    p.add_argument("--json", action="store_true", help="print rows as a JSON list of objects")
    p.add_argument("--max-rows", type=int, default=40)

    _add(dsub, "stats", "row counts and the shape of the data", "Print table statistics as JSON.", cmd_stats)

    p = _add(
        dsub,
        "split",
        "create an evaluation split",
        """\
        Create a split under splits/NAME/.
          temporal:       train before the cut; default cut = last --test-fraction of the time range;
                          validation = the last --val-fraction of the training period
                          (default: 2%, widened until it holds --min-val-users users).
          leave-last-out: each user's last positive engagement is the target.

        example:  ebr data split temporal --test-fraction 0.2
        """,
        cmd_split,
    )
    p.add_argument("kind", choices=["temporal", "leave-last-out"])
    p.add_argument("--name", help="split name (default: the kind)")
    p.add_argument("--cut", type=_ts, help="ISO-8601 cut time (temporal)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    vf = p.add_mutually_exclusive_group()
    vf.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="validation = this share of the training period, at its end (early stopping); default: "
        "2%%, widened in 1%% steps (up to 25%%) until it holds --min-val-users",
    )
    vf.add_argument(
        "--min-val-users",
        type=int,
        default=100,
        help="the default validation window holds at least this many warm users with a target",
    )

    cor = stages.add_parser(
        "corpus",
        help="build and evaluate the serving corpus",
        formatter_class=_Fmt,
        description="The serving corpus: what retrieval can ever return.",
    )
    csub = cor.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    p = _add(
        csub,
        "build",
        "build corpus/VERSION/corpus.parquet",
        """\
        Build the serving corpus: engagements in [as-of - window, as-of) -> time-decayed weighted
        score per pin (score = sum w(action) * 2^(-age / half-life); --no-decay = raw sum) -> remap
        fine image signatures to coarse ones -> one representative pin per coarse signature
        (highest score, ties by pin id) carrying the group's score -> top N. The SQL lives in
        src/ebr/corpus/sql/ and runs unchanged on DuckDB (default) or Spark local mode.

        examples:
          ebr corpus build --top-n 50000
          ebr corpus build --engine spark --no-decay --action-weights save=3,click=2,closeup=1
        """,
        cmd_corpus_build,
    )
    p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb")
    p.add_argument("--as-of", type=_ts, default=None, help="default: the temporal split's cut, else the last timestamp")
    p.add_argument("--window-days", type=float, default=90.0)
    p.add_argument("--half-life-days", type=float, default=14.0)
    p.add_argument("--no-decay", action="store_true", help="rank by the raw weighted sum over the window")
    p.add_argument("--top-n", type=int, default=1_000_000)
    p.add_argument("--action-weights", default="save=3,click=2,closeup=1")
    p = _add(
        csub,
        "eval",
        "share of next week's positives the corpus covers",
        """\
        Corpus coverage: the share of positive engagements in the --horizon-days after the corpus's
        as-of whose pin, or a duplicate of it (same coarse signature), is in the corpus.

        example:  ebr corpus eval --version latest
        """,
        cmd_corpus_eval,
    )
    p.add_argument("--version", default="latest")
    p.add_argument("--horizon-days", type=float, default=7.0)
    p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb")

    p = _add(
        stages,
        "train",
        "train a two-tower model",
        """\
        Train the two-tower retrieval model (sampled softmax over in-batch negatives, logQ
        correction from the exact in-batch inclusion probability). Two phases: selection (train on
        the training part, validation recall@100 per epoch, early stopping), then the refit (train
        again from scratch on training + validation for the selected number of steps; bundles serve
        it). Writes runs/RUN/: config.yaml, feature_state.json, metrics.jsonl, summary.json,
        checkpoints/{best,last}.pt (best = validation recall@100) and {refit,refit_last}.pt.

        Settings chosen per dataset on validation (default on; --no-choose trains the config as
        given): selection also runs without the pin-ID field (train.choose_pin_id) and, on data
        with real time, with each recency half-life in train.choose_recency_days (examples weighted
        2^(-age / half-life)), and, with train.choose_regularised (default on), on ids-only
        data with 1,024 uniform corpus negatives and dropout 0.2, in every combination; the best
        validation recall@100 is kept, refit and recorded (summary.json "choice"; the others under
        runs/RUN/alternatives/), provided it beats the run's own settings by more than
        train.choose_margin (default 1) standard errors of the per-user paired difference: a
        small validation window keeps the config as given.

        Chosen from the data and recorded in summary.json: the epoch cap (train.epochs unset: 8,
        more on small data, up to train.min_steps steps; early stopping ends no run before
        train.stop_after_steps), the training histories (features.history_as_of auto: on data
        without real time, e.g. a given split's adjacency files, each example reads the user's
        history as evaluation does, as of the end, without the example's own pin), a given
        split's validation (data.given_validation auto: each user's last 10% of training rows
        where the lines are in engagement order, else a random 10%; the former's file order
        counts as time: point-in-time histories), history positions
        (model.history_position auto: on where the targets are each user's next engagements,
        leave_last_out or engagement-ordered lines, with point-in-time histories) and the time
        since the user's last engagement (features.user_gap auto: on under a temporal split of
        data with timestamps).

        examples:
          ebr train --run main --epochs 8
          ebr train --run quick --no-refit     # serve the selected model (half the training time)
          ebr train --run fixed --no-choose    # the config as given: one selection, no alternatives
          ebr train --config run.yaml --set model.temperature=0.07 --set train.lr=0.001
          ebr train --run main --resume        # continue a crashed run from its last checkpoint
          ebr train --run ids --set model.id_embeddings=frozen   # after ebr pretrain-ids

        With model.id_embeddings frozen | finetune the model trains on the recent share of the
        training part (1 - data.id_pretrain_fraction) and takes pretrained user and pin ID tables
        from the latest snapshot whose window ends before that (train.id_snapshot to pick one).
        """,
        cmd_train,
    )
    p.add_argument("--config", help="YAML run config (sections data, features, model, train, index, eval)")
    p.add_argument("--run", default="main")
    p.add_argument("--resume", action="store_true", help="continue from runs/RUN/checkpoints/last.pt")
    p.add_argument("--no-refit", action="store_true", help="skip the refit on training + validation (train.refit)")
    p.add_argument("--no-choose", action="store_true",
                   help="train the config as given: no alternatives (train.choose_pin_id, train.choose_recency_days, "
                        "train.choose_regularised)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="model.id_embeddings: accept an ID snapshot whose window overlaps the training window "
                        "(ablations; recorded in summary.json with a warning)")
    p.add_argument("--epochs", type=int, help="the epoch cap (default: 8, more on small data: train.min_steps)")
    p.add_argument("--seed", type=int)
    p.add_argument("--split", help="split name (default: the given split if any, else temporal)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")

    p = _add(
        stages,
        "pretrain-ids",
        "pretrain user and pin ID embeddings (contrastive, TorchRec tables)",
        """\
        Contrastive pretraining of user and pin ID tables (TECHNIQUES.md 4): sampled softmax over
        in-batch + uniform negatives with logQ, every positive engagement of the window (all
        surfaces, no downsampling), several epochs; the tables are a TorchRec EmbeddingBagCollection
        with fbgemm's fused row-wise Adagrad, sharded table-wise or column-wise across processes.
        Writes WORKSPACE/pretrain/NAME/ (tables, ids, manifest with window, dims, counts, loss curve
        and content hash). Each finished epoch is checkpointed (tables and Adagrad state, in
        WORKSPACE/pretrain/.partial-NAME/); after a crash, the same command with --resume continues
        from the last finished epoch and gives the uninterrupted run's tables.

        The window: by default the older data.id_pretrain_fraction (0.7) of the split's training
        part (data without time: 70% of each user's training pairs, the older ones in file order
        where the lines are in engagement order, else a seeded draw: data.id_partition); the
        retrieval model with model.id_embeddings=frozen|finetune then trains on the recent rest and
        takes the latest snapshot whose window ends before its own. --window train pretrains on the whole training
        part (it overlaps every retrieval model: ablations, with ebr train --allow-overlap).

        examples:
          ebr pretrain-ids                              # defaults: dim 64, 10 epochs, older 70%
          ebr pretrain-ids --dim 32 --epochs 20 --run ids32
          ebr pretrain-ids --window 2026-01-01:2026-03-01
          ebr pretrain-ids --run ids32 --dim 32 --epochs 20 --resume   # after a crash: from the last epoch
          ebr pretrain-ids list
          ebr train --set model.id_embeddings=frozen    # uses the latest non-overlapping snapshot
          torchrun --nproc_per_node 2 -m ebr.cli pretrain-ids --run ids2   # 2 processes, gloo
        """,
        cmd_pretrain_ids,
    )
    p.add_argument("action", nargs="?", choices=["run", "list"], default="run", help="pretrain (default) or list")
    p.add_argument("--window", help="START:END (ISO dates/times), or 'train' (default: the older share)")
    p.add_argument("--split", help="split name (default: the given split if any, else temporal)")
    p.add_argument("--dim", type=int, help="embedding width (pretrain.dim, default 64)")
    p.add_argument("--epochs", type=int, help="epochs (pretrain.epochs, default 10)")
    p.add_argument("--batch-size", type=int, help="global batch (pretrain.batch_size, default 1024)")
    p.add_argument("--lr", type=float, help="row-wise Adagrad learning rate (pretrain.lr)")
    p.add_argument("--seed", type=int, help="initialisation and order seed (train.seed)")
    p.add_argument("--run", help="snapshot name (default: ids-TIMESTAMP)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished pretraining --run NAME from its last finished epoch "
                        "(the same settings; --epochs may grow)")
    p.add_argument("--config", help="YAML run config (sections data, features, pretrain, ...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--json", action="store_true", help="list: print the manifests as JSON")

    p = _add(
        stages,
        "tune",
        "search hyperparameters on validation recall (Optuna)",
        """\
        Hyperparameter search with Optuna: a TPE sampler proposes settings, each trial trains
        (selection phase only, no refit) and reports its validation recall@100 after every epoch;
        trials below the median of earlier ones at the same epoch are pruned. Only validation is
        read, never test. The study is stored in WORKSPACE/tune/NAME/study.db (SQLite): running
        the command again adds trials. The best trial's full config is written to
        WORKSPACE/tune/NAME/best.yaml.

        Default space: lr, temperature, output dim, dropout, weight decay, history length,
        crossing (mlp/masknet/dhen), pin-ID embeddings on/off, logQ on/off. --space FILE takes a
        YAML mapping, e.g.  train.lr: {type: float, low: 1.0e-4, high: 5.0e-3, log: true}

        examples:
          ebr tune --trials 20
          ebr tune --trials 10 --name small --space space.yaml --set train.epochs=4
          ebr train --config workspace/tune/main/best.yaml
        """,
        cmd_tune,
    )
    p.add_argument("--trials", type=int, default=20, help="trials to add to the study (default 20)")
    p.add_argument("--name", default="main", help="study name (WORKSPACE/tune/NAME)")
    p.add_argument("--space", help="YAML search space (default: the built-in one)")
    p.add_argument("--config", help="base YAML run config the trials start from")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config field")
    p.add_argument("--split", help="split name (default: the given split if any, else temporal)")
    p.add_argument("--seed", type=int, help="sampler seed and train.seed of the trials")
    p.add_argument("--json", action="store_true", help="print the study summary as JSON")

    idx = stages.add_parser(
        "index",
        help="build bundles",
        formatter_class=_Fmt,
        description="Bundles: the exported user tower, pin embeddings, index and user state.",
    )
    isub2 = idx.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    p = _add(
        isub2,
        "build",
        "build a bundle from a run's served checkpoint (refit, else best)",
        """\
        Build bundles/VERSION/ from runs/RUN/checkpoints/refit.pt (best.pt when the run has no
        refit). The user state and the time term (pin age, recent counts) are taken as of
        the split's cut (what evaluation uses), or of the latest data with --split latest
        (what serving uses). The manifest records the index's recall@100 against exact search on
        a sample of users.

        examples:
          ebr index build --run main --split latest --backend hnsw
          ebr index build --backend ivfpq --corpus latest
        """,
        cmd_index_build,
    )
    p.add_argument("--run", default="main")
    p.add_argument("--split", default=None, help="split name, or 'latest' for all data (default: the run's split)")
    p.add_argument(
        "--backend",
        choices=["exact", "hnsw", "ivfpq"],
        default="exact",
        help="exact = brute force; hnsw = graph (M=32, efSearch 512); ivfpq = inverted lists + PQ, re-ranked",
    )
    p.add_argument("--corpus", default=None, help="index only this serving corpus (VERSION or 'latest')")
    p = _add(
        isub2,
        "check",
        "verify a bundle: every problem, exit 1 if any",
        """\
        Run the checks the loader runs, and report every problem found (not only the first):
        unsafe user-tower archive contents (pickled or custom weights, sample inputs, non-ATen
        calls), files that are missing, unexpected, links or not regular, checksum mismatches, a
        version that does not match the manifest's content hash, mismatched model versions.
        A bundle rewritten as a whole (checksums and version recomputed) passes the integrity
        checks; --expect-version pins the version you built.

        examples:
          ebr index check workspace/bundles/VERSION
          ebr index check workspace/bundles/VERSION --expect-version VERSION --json
        """,
        cmd_index_check,
    )
    p.add_argument("bundle", help="bundle folder (bundles/VERSION)")
    p.add_argument("--expect-version", default=None, help="also require this exact version")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = _add(
        stages,
        "retrieve",
        "batch retrieval through a bundle",
        """\
        Offline candidate generation: k pins per user through the bundle's Retriever (the same code
        the service runs). Users without history get the cold-start path (popular pins). --mode
        multi (bundles of a model with model.user_embeddings other than single): one search per
        user embedding, merged round-robin; each item's source names its embedding (emb0, ...).
        --mode conditional (bundles of a model with model.conditional: true) --interests A,B: one
        interest-conditioned search per interest, among that interest's pins, merged round-robin
        (source interest:A, ...); --mode auto: the implicit embedding(s) plus each user's followed
        and inferred interests. Otherwise --interests filters the results.

        example:  ebr retrieve --bundle workspace/bundles/VERSION --users users.txt --k 100 --json out.json
        """,
        cmd_retrieve,
    )
    p.add_argument("--bundle", default="latest", help="a folder, a VERSION under WORKSPACE/bundles, or 'latest'")
    p.add_argument("--users", required=True, help="file with one user id per line")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--mode", choices=["single", "multi", "conditional", "auto"], default="single",
                   help="single, multi (several user embeddings), conditional (one list per --interests), auto "
                        "(conditional auto on a conditional bundle, else multi where the bundle has it)")
    p.add_argument("--interests", default=None,
                   help="comma-separated interest ids: the conditions (--mode conditional), else a filter")
    p.add_argument("--json", required=True, help="output file")

    p = _add(
        stages,
        "serve",
        "serve a bundle over HTTP",
        """\
        Start the retrieval service (FastAPI on uvicorn) over a bundle:
          POST /v1/retrieve  {"user_id": "u1", "k": 100, "mode": "single", "interests": [], "exclude": [],
                              "history": [...], "features": {...}}
          GET /healthz, GET /readyz, GET /metrics (Prometheus), GET /docs (OpenAPI)
          POST /v1/admin/reload {"bundle": PATH} with 'Authorization: Bearer $EBR_ADMIN_TOKEN'

        example:  EBR_ADMIN_TOKEN=secret ebr serve workspace/bundles/VERSION --port 8000
        """,
        cmd_serve,
    )
    p.add_argument(
        "bundle", nargs="?", default="latest", help="bundle: a folder, a VERSION under WORKSPACE/bundles, or 'latest'"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--timeout-ms", type=int, default=2000, help="per-request time limit")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads per request")
    p.add_argument("--retrieval-threads", type=int, default=2,
                   help="retrievals computed at once (their torch/FAISS work releases the GIL); more wait, "
                        "their wait counted in --timeout-ms")
    p.add_argument(
        "--expect-version",
        default=None,
        help="refuse to start unless the bundle's version is this (catches a bundle rewritten as a whole)",
    )

    p = _add(
        stages,
        "explore",
        "a web page showing what the retriever does for one user",
        """\
        Start the service over a bundle and print the explorer page's address: GET /explore (and
        /explore?user=ID for one user). For a user picked by id or from a searchable list, the page
        shows the stored history as tiles (newest first, coloured from each pin's embedding, hides
        hatched), and the candidates /v1/retrieve returns, each tagged with its source; in multi
        mode each embedding's cluster of history items (with its importance) beside the candidates
        it brought. On a synthetic workspace it also shows the user's true latent interests
        (WORKSPACE/truth, diagnostics). The page is shipped in the package (no CDN, works offline).

        example:  ebr explore latest --workspace workspace --port 8001
        """,
        cmd_serve,
    )
    p.add_argument(
        "bundle", nargs="?", default="latest", help="bundle: a folder, a VERSION under WORKSPACE/bundles, or 'latest'"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--timeout-ms", type=int, default=2000, help="per-request time limit")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads per request")
    p.add_argument("--retrieval-threads", type=int, default=2,
                   help="retrievals computed at once (their torch/FAISS work releases the GIL); more wait, "
                        "their wait counted in --timeout-ms")
    p.set_defaults(explore=True, expect_version=None)

    p = _add(
        stages,
        "eval",
        "offline evaluation against peers",
        """\
        Evaluate a run through the serving Retriever over its exact bundle (built or reused), with
        peers counted identically (EVALUATION.md). Writes a report under reports/NAME/.

        examples:
          ebr eval --run main --json eval.json
          ebr eval --split given --peers popularity,als --json eval.json
          ebr eval --candidates cands.txt --json sampled.json   # sampled protocol: 'user target cand ...'
          ebr eval --bundle workspace/bundles/VERSION --json hnsw.json   # what an ANN bundle loses
          ebr eval --conditional --json plain.json   # a plain model's filtered per-interest numbers

        A conditional model (model.conditional: true) also gets the "conditional" block: filtered
        HR@K / Recall@K per (user, interest) on test engagements with a source interest (or the
        target's interests where none is logged), topic match of the unfiltered top K, long-tail
        interests apart, against the same run unconditioned and the interest's popular pins.
        """,
        cmd_eval,
    )
    p.add_argument("--run", default="main")
    p.add_argument("--split", default=None)
    p.add_argument("--peers", default="popularity,interest_popular,als")
    p.add_argument("--candidates", help="sampled protocol: lines 'user target cand1 cand2 ...'")
    p.add_argument("--corpus", help="restrict candidates to a serving corpus (VERSION or 'latest')")
    p.add_argument(
        "--bundle",
        help="measure this bundle (e.g. HNSW, IVF-PQ) instead of the run's exact one; "
        "it must be built as of the split (refused if it can see the test part)",
    )
    p.add_argument("--json", help="write the results JSON here")
    p.add_argument("--report", default="latest", help="report name under reports/")
    p.add_argument("--conditional", action="store_true",
                   help="also measure per-(user, interest) filtered retrieval (default: conditional models only)")

    from ebr import demo as _demo

    p = _add(
        stages,
        "demo",
        "run every built stage on the synthetic world",
        """\
        The end-to-end demo (what `make demo` runs): generate the small synthetic world, train the
        two-tower model, build its bundle, evaluate it against popularity, interest-popular and ALS,
        print the results table and write a report (Markdown + PNG) under reports/demo/.

        Training chooses per-dataset settings on validation (several selection runs) and refits;
        for a quicker look:

          ebr demo --no-choose                 # one selection run, then the refit
          ebr demo --preset tiny --no-choose --no-refit
        """,
        _demo.cmd_demo,
    )
    p.add_argument("--preset", choices=["tiny", "small"], default="small")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--no-choose", action="store_true",
                   help="train the config as given, no per-dataset alternatives (about 3x faster training)")
    p.add_argument("--no-refit", action="store_true", help="skip the refit on training + validation")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    return root


def main(argv: list[str] | None = None) -> int:
    import logging

    from ebr.errors import EbrError
    from ebr.log import setup

    args = build_parser().parse_args(argv)
    setup(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.fn(args)
    except EbrError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
