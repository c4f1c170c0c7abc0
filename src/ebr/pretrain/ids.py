"""`ebr pretrain-ids`: contrastive pretraining of user and pin ID tables (TECHNIQUES.md 4).

The minimal model Hsu et al. pretrain on broad data: score(u, i) = <e_u, e_i> / tau on L2-normalised
rows of a user table and a pin table, trained with sampled softmax over the batch's positives
(in-batch negatives) plus one uniform corpus negative per row, each column corrected by its logQ
(the exact in-batch inclusion probability for positives, B / P for the uniform ones). Every positive
engagement of the window counts, from every surface, with its action weight; no downsampling;
several epochs.

The tables live in a TorchRec EmbeddingBagCollection sharded by DistributedModelParallel (table-wise
or column-wise on CPU over gloo; row-wise needs GPUs) with fbgemm's fused TBE and row-wise Adagrad
applied in the backward pass. One process runs the same code with a one-process group; under
`torchrun --nproc_per_node N -m ebr.cli pretrain-ids` each rank computes its chunk of the global
batch and the columns are gathered across ranks (train/distributed.py). The tables are initialised
from the seed as full tables and copied into each rank's shards, so a run's start does not depend on
how many processes share it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ebr.config import RunConfig
from ebr.data.splits import Part, load_split
from ebr.errors import EbrError
from ebr.features.examples import load_engagements, positive_examples
from ebr.features.state import FIRST_ID, build_feature_state
from ebr.log import bar, log
from ebr.pretrain import snapshots
from ebr.pretrain.windows import IdWindow, custom_window, mask, whole_window, windows
from ebr.train import distributed
from ebr.train.loss import inclusion_log_prob, sampled_softmax_logq
from ebr.workspace import Workspace, check_name, library_versions, now_utc, version_stamp

TABLES = ("user", "pin")


def _ebc(n_users: int, n_pins: int, dim: int, lr: float, sharding: str, ranks: distributed.Ranks):
    """The sharded EmbeddingBagCollection (features user -> user table; pin, neg -> pin table)."""
    import torchrec
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    ebc = torchrec.EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=n_users, feature_names=["user"],
                           pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="pin", embedding_dim=dim, num_embeddings=n_pins, feature_names=["pin", "neg"],
                           pooling=PoolingType.SUM)], device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": lr})
    cons = {t: ParameterConstraints(sharding_types=[sharding]) for t in TABLES}
    sharders = [EmbeddingBagCollectionSharder()]
    import logging

    quiet = [logging.getLogger(n) for n in ("torchrec.distributed.planner.types",
                                            "torchrec.distributed.planner.storage_reservations",
                                            "torchrec.distributed.planner.stats")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=ranks.world, compute_device="cpu"),
                                           constraints=cons)
        import torch.distributed as dist

        plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)


def _tables(model) -> dict:
    return {k.split(".")[-2]: v for k, v in model.state_dict().items() if k.endswith(".weight")}


def _state(model) -> dict:
    """The sharded tensors a resume restores: the tables (user, pin) and the fused row-wise
    Adagrad's accumulators (user.momentum1, pin.momentum1: one value per row)."""
    out = dict(_tables(model))
    for st in model.fused_optimizer.state_dict()["state"].values():
        out.update(st)
    return out


@torch.no_grad()
def _init(shards: dict, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (by name) into this rank's shards of `shards` (_tables or _state)."""
    for name, src in full.items():
        for shard in shards[name].local_shards():
            idx = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.copy_(src[idx])


def _gather(shards: dict, ranks: distributed.Ranks) -> dict[str, np.ndarray]:
    """The full tensors of `shards` on rank 0 (empty dict elsewhere)."""
    out = {}
    for name, st in shards.items():
        full = torch.zeros(st.size()) if ranks.main else None
        st.gather(dst=0, out=full)
        if ranks.main:
            out[name] = full.numpy()
    return out


def partial_dir(ws: Workspace, name: str) -> Path:
    """Where an unfinished run keeps its last finished epoch (a dot folder: never a snapshot): one
    file of local shards per rank, epoch{k}.rank{r}.pt, and last.json naming the epoch every rank
    has written."""
    return snapshots.root(ws) / f".partial-{name}"


def _local(model) -> dict[str, torch.Tensor]:
    """This rank's shards of the tables and of their Adagrad accumulators, keyed name@offsets."""
    return {f"{name}@{','.join(map(str, sh.metadata.shard_offsets))}": sh.tensor
            for name, st in sorted(_state(model).items()) for sh in st.local_shards()}


def _save_partial(folder: Path, model, meta: dict, ranks: distributed.Ranks) -> None:
    """Every rank writes its local shards for the finished epoch (temp + rename), then rank 0 points
    last.json at it and removes the previous epoch's files: a crash at any point leaves one whole
    epoch to resume."""
    k = meta["epoch"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch{k}.rank{ranks.rank}.pt"
    torch.save({**meta, "shards": {key: t.detach().clone() for key, t in _local(model).items()}},
               path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    distributed.barrier()
    if ranks.main:
        tmp = folder / "last.json.tmp"
        tmp.write_text(json.dumps({"epoch": k, "processes": ranks.world}))
        os.replace(tmp, folder / "last.json")
        for old in folder.glob("epoch*.rank*.pt"):
            if not old.name.startswith(f"epoch{k}."):
                old.unlink(missing_ok=True)
    distributed.barrier()


def _load_partial(ws: Workspace, name: str, fingerprint: str, model, epochs: int,
                  ranks: distributed.Ranks) -> dict:
    """Restore this rank's shards from the last finished epoch of pretraining `name` (plain tensors:
    weights_only), checked against this run's settings, shard by shard; returns its metadata."""
    folder = partial_dir(ws, name)
    again = "run without --resume to start again"
    if not (folder / "last.json").is_file():
        raise EbrError(f"no unfinished pretraining {name!r} to resume (nothing in {folder}); run without --resume")
    try:
        k = json.loads((folder / "last.json").read_text())["epoch"]
        if not isinstance(k, int) or k < 1:
            raise ValueError(k)
        ck = torch.load(folder / f"epoch{k}.rank{ranks.rank}.pt", weights_only=True)
        if not isinstance(ck, dict) or not isinstance(ck.get("shards"), dict):
            raise ValueError("not a checkpoint")
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line, never a traceback
        raise EbrError(f"the checkpoint of pretraining {name!r} is missing, truncated or corrupt "
                       f"({type(e).__name__}); {again}") from None
    if ck.get("fingerprint") != fingerprint:
        try:
            old = json.loads(ck.get("fingerprint") or "{}")
        except ValueError:
            old = {}
        new = json.loads(fingerprint)
        diff = sorted(x for x in set(old) | set(new) if old.get(x) != new.get(x))
        raise EbrError(f"pretraining {name!r} was started with other settings ({', '.join(diff)} differ); "
                       f"resume with the same ones, or {again}")
    if ck.get("epoch") != k or k > epochs:
        raise EbrError(f"pretraining {name!r} finished epoch {ck.get('epoch')} and this run asks for {epochs} "
                       f"epochs: resume with --epochs {ck.get('epoch')} or more, or {again}")
    mine, saved = _local(model), ck["shards"]
    bad = sorted(set(mine) ^ set(saved)) + sorted(
        key for key in set(mine) & set(saved)
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != mine[key].shape
        or saved[key].dtype != mine[key].dtype or not torch.isfinite(saved[key]).all())
    if bad:
        raise EbrError(f"the checkpoint of pretraining {name!r} does not fit this run's shards ({bad[0]}); {again}")
    with torch.no_grad():
        for key, t in mine.items():
            t.copy_(saved[key])
    return ck


def resolve_window(e, split, cfg: RunConfig, window: str | None) -> IdWindow:
    """--window: None (the older id_pretrain_fraction of the training part), 'train' (all of it,
    an overlapping snapshot for ablations) or START:END (ISO times, data with time only)."""
    val_seed = cfg.train.seed if split.kind == "given" else 0
    frac, seed = cfg.data.id_pretrain_fraction, cfg.data.id_pretrain_seed
    if window is None:
        return windows(e, split.name, frac, seed, val_seed, cfg.data.id_partition)[0]
    if window == "train":
        return whole_window(e, split.name, frac, seed, val_seed)
    import datetime as dt

    try:
        a, b = window.split(":", 1) if window.count(":") == 1 else window.split("/", 1)
        ts = [dt.datetime.fromisoformat(x) for x in (a, b)]
    except ValueError:
        raise EbrError(f"--window {window!r}: expected START:END dates (e.g. 2026-01-01:2026-03-01), START/END "
                       "ISO times, or 'train'") from None
    us = [int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp() * 1e6) for t in ts]
    return custom_window(e, split.name, us[0], us[1])


def pretrain_ids(ws: Workspace, cfg: RunConfig, window: str | None = None, name: str | None = None,
                 progress: bool = True, resume: bool = False) -> dict:
    """Pretrain the ID tables on the window and save a snapshot; returns its manifest (rank 0; the
    other ranks return an empty dict). Each finished epoch is checkpointed (partial_dir: tables and
    Adagrad state); `resume` continues the unfinished run `name` from its last finished epoch, with
    the same result as an uninterrupted run. A process group this call creates, it destroys."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    try:
        return _pretrain(ws, cfg, window, name, progress, distributed.setup(need_group=True), resume)
    finally:
        if owned:
            distributed.teardown()


def _pretrain(ws: Workspace, cfg: RunConfig, window: str | None, name: str | None, progress: bool,
              ranks: distributed.Ranks, resume: bool = False) -> dict:
    p = cfg.pretrain
    if p.batch_size < ranks.world:
        raise EbrError(f"pretrain.batch_size {p.batch_size} is smaller than the {ranks.world} processes")
    if resume and not name:
        raise EbrError("--resume needs the --run name of the unfinished pretraining")
    name = name or f"ids-{version_stamp()}"
    check_name(name, "snapshot")
    t0 = time.time()
    fs = build_feature_state(ws)
    split = load_split(ws, cfg.data.split)
    e = load_engagements(ws, fs, split, seed=cfg.train.seed, given_validation_mode=cfg.data.given_validation)
    w = resolve_window(e, split, cfg, window)
    ex = positive_examples(e, cfg.features, parts=(Part.TRAIN,), within=mask(e, w))
    users, pins, weight = ex.user, ex.pin, ex.weight
    if len(users) == 0:
        raise EbrError(f"the window {w.describe()} has no positive engagements "
                       f"({', '.join(cfg.features.positive_actions)}): choose another window or split")
    n_users, n_pins = len(fs.users), len(fs.pins)
    torch.manual_seed(cfg.train.seed)
    g = torch.Generator().manual_seed(cfg.train.seed)
    full = {"user": torch.randn(n_users, p.dim, generator=g) * p.init_std,
            "pin": torch.randn(n_pins, p.dim, generator=g) * p.init_std}
    model = _ebc(n_users, n_pins, p.dim, p.lr, p.sharding, ranks)
    _init(_tables(model), full)
    B = p.batch_size
    log_q = inclusion_log_prob(np.bincount(pins, minlength=n_pins), B)
    neg_lq = math.log(B / max(n_pins - FIRST_ID, 1))
    w_t = torch.from_numpy(weight)
    n, steps_per_epoch = len(users), math.ceil(len(users) / B)
    curve, seen, start = [], 0, 0
    # what must match for a resume to continue the same run (the epoch count may grow): the
    # settings and a hash of the examples themselves
    data = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in (users, pins, weight))).hexdigest()
    fingerprint = json.dumps({"config": {k: v for k, v in p.model_dump().items() if k != "epochs"},
                              "seed": cfg.train.seed, "window": w.to_dict(), "split": split.name,
                              "positive_actions": cfg.features.positive_actions,
                              "action_weights": cfg.features.action_weights, "examples": data,
                              "rows": [n_users, n_pins], "processes": ranks.world}, sort_keys=True, default=str)
    partial = partial_dir(ws, name)
    if resume:
        ck = _load_partial(ws, name, fingerprint, model, p.epochs, ranks)
        start, curve, seen = int(ck["epoch"]), [float(x) for x in ck["loss_curve"]], int(ck["seen"])
        if ranks.main and progress:
            log.info("pretrain %s: resumed after epoch %d of %d", name, start, p.epochs)
    fail_at = int(os.environ.get("EBR_FAIL_AT_STEP", "0")) if os.environ.get("EBR_FAIL_PHASE") == "pretrain" else 0
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    t_train, ck_seconds = time.time(), 0.0

    for epoch in range(start, p.epochs):
        perm = np.random.default_rng([cfg.train.seed, 0x1D5, epoch]).permutation(n)
        pbar = bar(steps_per_epoch, f"pretrain epoch {epoch + 1}/{p.epochs}", progress and ranks.main, unit="step")
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            if fail_at and epoch * steps_per_epoch + step + 1 == fail_at:
                raise RuntimeError(f"injected failure at pretraining step {fail_at} (EBR_FAIL_AT_STEP)")
            idx = perm[step * B: (step + 1) * B]
            off, size, sizes = ranks.chunk(len(idx))
            loc = idx[off: off + size]
            negs = np.random.default_rng([cfg.train.seed, 0x4E6, epoch, step]).integers(FIRST_ID, n_pins, len(idx))
            u_codes, p_codes = torch.from_numpy(users[loc]), torch.from_numpy(pins[loc])
            n_codes = torch.from_numpy(negs[off: off + size])
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=["user", "pin", "neg"], values=torch.cat([u_codes, p_codes, n_codes]),
                lengths=torch.ones(3 * size, dtype=torch.int32))
            d = model(kjt).to_dict()
            u = F.normalize(d["user"], dim=-1)
            v = distributed.gather_rows(F.normalize(d["pin"], dim=-1), sizes)
            all_pins = torch.from_numpy(pins[idx])
            neg = neg_ids = neg_q = None
            if p.uniform_negatives:
                neg = distributed.gather_rows(F.normalize(d["neg"], dim=-1), sizes)
                neg_ids, neg_q = torch.from_numpy(negs), torch.full((len(idx),), neg_lq)
            loss = sampled_softmax_logq(u, v, all_pins, log_q[all_pins], p.temperature, w_t[loc], neg, neg_ids, neg_q,
                                        row_offset=off, norm=len(idx))
            loss.backward()  # the fused row-wise Adagrad updates the tables here
            loss_sum += distributed.all_sum(float(loss.detach())) * len(idx)
            seen += len(idx)
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_sum / min(seen - epoch * n, n):.3f}")
        pbar.close()
        curve.append(round(loss_sum / n, 5))
        if ranks.main and progress:
            log.info("pretrain epoch %d: loss %.4f", epoch + 1, curve[-1])
        if epoch + 1 < p.epochs:
            t_ck = time.time()
            _save_partial(partial, model, {"epoch": epoch + 1, "loss_curve": curve, "seen": seen,
                                           "fingerprint": fingerprint}, ranks)
            ck_seconds += time.time() - t_ck
    # the training steps of this process's epochs (checkpoints left out)
    seconds, trained = time.time() - t_train - ck_seconds, seen - start * n
    tables = _gather(_tables(model), ranks)
    distributed.barrier()
    if not ranks.main:
        return {}
    lookups = 3 if p.uniform_negatives else 2
    manifest = {
        "window": w.to_dict(), "window_text": w.describe(), "split": split.name, "dim": p.dim,
        "config": p.model_dump(), "seed": cfg.train.seed, "positive_actions": cfg.features.positive_actions,
        "counts": {"examples": int(n), "users": int(len(np.unique(users))), "pins": int(len(np.unique(pins))),
                   "user_rows": n_users - FIRST_ID, "pin_rows": n_pins - FIRST_ID},
        "loss_curve": curve, "processes": ranks.world,
        "resumed_after_epoch": start or None,
        "throughput": {"examples_per_s": round(trained / max(seconds, 1e-9), 1),
                       "ids_per_s": round(lookups * trained / max(seconds, 1e-9), 1),
                       "train_seconds": round(seconds, 2),
                       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "seconds": round(time.time() - t0, 2), "created_at": now_utc().isoformat(), "versions": library_versions(),
    }
    out = snapshots.save(ws, name, list(fs.users.ids), list(fs.pins.ids), tables["user"][FIRST_ID:],
                         tables["pin"][FIRST_ID:], manifest)
    shutil.rmtree(partial, ignore_errors=True)  # the snapshot is whole: nothing left to resume
    return out
