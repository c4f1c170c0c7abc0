"""`ebr train`: the training loop, validation recall per epoch, checkpoints and resume.

A run folder holds config.yaml, feature_state.json, metrics.jsonl and checkpoints/{best,last}.pt.
Checkpoints are plain dicts of tensors and Python values (state dict, config, sizes, feature
state): `torch.load(weights_only=True)` reads them without importing this package's code.

Determinism: the example order of epoch e is a permutation drawn from (seed, e); the 'last'
checkpoint stores the model, optimiser, frequency estimator, RNG states and the position in the
epoch, so a resumed run replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ebr.config import REGULARISED, RunConfig, TrainConfig
from ebr.data.splits import Part, load_split
from ebr.errors import EbrError
from ebr.features.age import N_AGE_BUCKETS, NOT_YET, TimeFields
from ebr.features.batches import PinInputs, UserBatch, user_batch
from ebr.features.examples import (
    T_MAX,
    Examples,
    Histories,
    draw_conditions,
    eval_spec,
    first_day_weights,
    positive_examples,
    recency_weights,
    user_weights,
)
from ebr.features.pinstats import PinStats
from ebr.features.snapshot import build_snapshot
from ebr.features.state import FIRST_ID, FeatureState, build_feature_state
from ebr.log import bar, log
from ebr.model.interests import nearest_embedding
from ebr.model.towers import TwoTower
from ebr.ranking import max_over_embeddings, metrics_at_k, topk_masked
from ebr.stages import Stages, mark
from ebr.train import distributed
from ebr.train.loss import FrequencyEstimator, inclusion_log_prob, sampled_softmax_logq
from ebr.workspace import Workspace, folder_lock, load_checkpoint_state, now_utc, write_json

VAL_K = 100


class InjectedFailure(RuntimeError):
    """Raised at EBR_FAIL_AT_STEP (tests of resume)."""


@dataclass
class TrainData:
    fs: FeatureState
    pins: PinInputs
    users: object
    hist: Histories
    examples: Examples
    val: object  # EvalSpec of the validation part; None in the refit phase (it trains on validation)
    split_name: str
    stats: PinStats | None
    candidates: np.ndarray  # (n_pins,) bool: pins that exist at the end of the visible data
    time: TimeFields | None  # the time term's fields from the visible data (None: no time term)
    as_of: int  # time of the last visible engagement
    interest_features: bool = False  # pins and users carry interests the model embeds
    # model.id_embeddings: the snapshot's manifest and its (user, pin) tables on this vocabulary
    id_snapshot: dict | None = None
    id_tables: tuple[np.ndarray, np.ndarray] | None = None
    id_overlap: bool = False  # the snapshot's window overlaps the training window (--allow-overlap)
    action_weight: np.ndarray | None = None  # the examples' weights before recency weighting
    timed: bool = False  # real time (a recency half-life applies); False: pseudo-time, the file order
    # model.history_position resolved: the history's length when the user tower embeds each slot's
    # position, else 0 (sizes["history_positions"])
    history_positions: int = 0
    user_gap: bool = False  # features.user_gap resolved: the user tower reads the time since the last event
    given_validation: str | None = None  # a given split's validation rows as resolved: random or last
    line_order: str | None = None  # what data.given_validation auto read from the lines: sorted, engagement, none

    @property
    def ordered(self) -> bool:
        """Each user's events are in a known order: real time, or a given split's file order where
        its lines are in engagement order (validation: each user's last rows)."""
        return self.timed or self.given_validation == "last"

    @property
    def gap_as_of(self) -> int | None:
        """user_batch's gap_as_of: the end of the visible data, where the user tower reads gaps."""
        return self.as_of if self.user_gap else None

    def pin_stats(self, pins: np.ndarray, t: np.ndarray) -> torch.Tensor | None:
        return None if self.stats is None else torch.from_numpy(self.stats.at(pins, t))

    def all_stats(self) -> torch.Tensor | None:
        """Statistics of every pin code as of the end of the visible (training) data."""
        n = self.pins.cat.shape[0]
        return self.pin_stats(np.arange(n), np.full(n, T_MAX))

    def time_buckets(self, pins: np.ndarray, t: np.ndarray) -> torch.Tensor | None:
        """(B, N, F) time-term buckets of each pin (N,) as of each example's time t (B,); None
        without the time term."""
        if self.time is None:
            return None
        return torch.from_numpy(self.time.buckets(pins[None, :], np.asarray(t)[:, None]))

    def positives(self) -> np.ndarray:
        """(n_pins,) training examples (positives) per pin code."""
        return np.bincount(self.examples.pin, minlength=self.sizes["n_pins"])

    @property
    def sizes(self) -> dict:
        return {**self.fs.sizes, "n_pin_stats": self.stats.width if self.stats is not None else 0,
                "interest_features": self.interest_features,
                "time_fields": self.time.sizes if self.time is not None else [],
                "history_positions": self.history_positions,
                "user_gap": N_AGE_BUCKETS if self.user_gap else 0,
                "pretrained_id_dim": self.id_snapshot["dim"] if self.id_snapshot else 0}


def prepare(ws: Workspace, cfg: RunConfig, fs: FeatureState | None = None, refit: bool = False) -> TrainData:
    """Training's view of the features snapshot. Model selection reads the TRAIN part only
    (validation picks the model, so nothing of it may reach training examples, histories or
    statistics); the refit phase (`refit`) reads TRAIN and VALIDATION and has no validation. TEST
    is never read."""
    split = load_split(ws, cfg.data.split)
    parts = (Part.TRAIN, Part.VALIDATION) if refit else (Part.TRAIN,)
    snap = build_snapshot(ws, fs or build_feature_state(ws), split, cfg.features, cfg.train.seed, parts,
                          cfg.data.given_validation)
    within, ids = None, (None, None, False)
    if cfg.model.id_embeddings != "none" or cfg.data.recent_only:  # the recent window; histories read all
        within, ids = _id_window(ws, cfg, snap, parts)
    ex = positive_examples(snap.e, cfg.features, parts=parts, within=within)
    if len(ex.user) == 0:
        raise EbrError(f"split {split.name!r} has no positive training engagements "
                       f"({', '.join(cfg.features.positive_actions)}){' in the retrieval window' if ids[0] else ''}")
    val = None if refit else eval_spec(snap.e, cfg.features, target_part=Part.VALIDATION, train_parts=(Part.TRAIN,),
                                       max_users=cfg.train.val_users, seed=cfg.train.seed)
    interest = cfg.features.interest_features and snap.fs.sizes["n_interests"] > FIRST_ID
    d = TrainData(snap.fs, snap.pins, snap.users, snap.hist, ex, val, split.name, snap.stats, snap.candidates,
                  snap.time, snap.as_of, interest, *ids, action_weight=ex.weight, timed=snap.e.timed,
                  given_validation=snap.e.given_validation, line_order=snap.e.line_order)
    if history_positions(cfg, d.ordered, split.kind):
        d.history_positions = cfg.features.history_len
    d.user_gap = user_gap(cfg, d.timed, split.kind)
    return _weighted(d, cfg.train)


def _id_window(ws: Workspace, cfg: RunConfig, snap, parts: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """A model with pretrained IDs trains on the recent window of the training part (in the refit,
    with validation); its snapshot: train.id_snapshot, else the latest whose window ends before.
    Returns (the examples' window mask, (manifest, tables, overlaps)); data.recent_only without
    IDs: (the mask, (None, None, False))."""
    from ebr.config import ModelConfig
    from ebr.pretrain import snapshots
    from ebr.pretrain.windows import IdWindow, mask, windows

    val_seed = cfg.train.seed if snap.split.kind == "given" else 0
    _, w = windows(snap.e, snap.split.name, cfg.data.id_pretrain_fraction, cfg.data.id_pretrain_seed, val_seed,
                   cfg.data.id_partition)
    if cfg.model.id_embeddings == "none":
        return mask(snap.e, w, parts), (None, None, False)
    m = snapshots.choose(ws, w, cfg.train.id_snapshot, cfg.train.allow_overlap)
    if cfg.model.id_dim not in (ModelConfig.model_fields["id_dim"].default, m["dim"]):
        raise EbrError(f"model.id_dim is {cfg.model.id_dim} but ID snapshot {m['name']!r} has width {m['dim']}: "
                       "drop model.id_dim (a pretrained table brings its width) or pretrain with --dim "
                       f"{cfg.model.id_dim}")
    overlap = IdWindow.from_dict(m["window"]).overlaps(w)
    return mask(snap.e, w, parts), (m, snapshots.load_tables(ws, m, snap.fs.users, snap.fs.pins), overlap)


def index_vectors(model: TwoTower, d: TrainData, pin_emb: torch.Tensor) -> torch.Tensor:
    """What an index built at the end of the visible data stores per pin (time term as of then)."""
    n = pin_emb.shape[0]
    b = None if d.time is None else torch.from_numpy(d.time.buckets(np.arange(n), d.as_of))
    return model.index_vectors(pin_emb, b)


@torch.no_grad()
def validation_recalls(model: TwoTower, d: TrainData, L: int) -> np.ndarray:
    """Each validation user's recall@VAL_K (their mean: the validation recall)."""
    spec = d.val
    if len(spec.users) == 0:
        return np.zeros(0)
    model.eval()
    P = index_vectors(model, d, model.encode_all_pins(d.pins.fields(), d.all_stats())[1])
    allowed = torch.from_numpy(d.candidates)  # pins that exist before the validation window
    tops = []
    for lo in range(0, len(spec.users), 512):
        ub = user_batch(spec.users[lo : lo + 512], spec.t[lo : lo + 512], d.hist, d.users, L, gap_as_of=d.gap_as_of)
        u, _ = model.embed_users_and_pins(ub.hist, ub.rest(), torch.zeros(0, dtype=torch.int64), d.pins.take)
        # multi-embedding: each pin scored by its best embedding of the user (EVALUATION.md)
        s = max_over_embeddings(u[0], u[1], P) if isinstance(u, tuple) else u @ P.T
        tops.append(topk_masked(s, VAL_K, spec.exclude[lo : lo + 512], allowed)[1].numpy())
    model.train()
    return metrics_at_k(np.concatenate(tops), spec.targets, [VAL_K], per_user=True)[f"recall@{VAL_K}"]


def epoch_order(ex: Examples, batch: int, seed: int, epoch: int, time_local: bool) -> np.ndarray:
    """The example order of one epoch, drawn from (seed, epoch): a permutation, or with
    time_local the time-sorted examples cut into batch-sized blocks taken in a random order."""
    rng = np.random.default_rng([seed, epoch])
    if not time_local:
        return rng.permutation(len(ex.user))
    by_time = np.argsort(ex.t, kind="stable")
    blocks = np.array_split(by_time, max(1, -(-len(by_time) // batch)))
    return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _ignored_settings(given: RunConfig, saved: RunConfig) -> list[str]:
    """Settings given (not left at their default) that differ from the checkpoint's: a resume keeps
    the checkpoint's, and says which it ignores."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b, d = flat(given.model_dump()), flat(saved.model_dump()), flat(RunConfig().model_dump())
    return [
        f"{k} (given {a[k]!r}, checkpoint {b.get(k)!r})" for k in sorted(a) if a[k] != b.get(k) and a[k] != d.get(k)
    ]


def train(ws: Workspace, cfg: RunConfig, run: str = "main", resume: bool = False, progress: bool = True,
          on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Train a two-tower model; returns the summary (best validation recall, steps, timings). The run
    folder is locked while training: a second `ebr train --run` of it is refused. `on_epoch(epoch,
    validation recall)` is called after each selection epoch (`ebr tune` prunes trials there)."""
    import contextlib

    import torch.distributed as dist

    owned = distributed.launched() and not dist.is_initialized()
    ranks = distributed.setup()  # torchrun: one process per rank, gloo; else one process, no group
    try:  # rank 0 holds the run's lock and writes its files; every rank trains
        with folder_lock(ws.run_dir(run), f"run {run!r}") if ranks.main else contextlib.nullcontext():
            return _train(ws, cfg, run, resume, progress and ranks.main, on_epoch, ranks)
    finally:
        if owned:
            distributed.teardown()


@dataclass
class TrainState:
    """Everything a resumed run needs to replay exactly the steps an uninterrupted one takes."""

    model: TwoTower
    opt: torch.optim.Optimizer
    est: FrequencyEstimator
    epoch: int = 0
    pos_in_epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_step: int = 0  # the step of the best validation recall (the refit trains that many)
    best_users: np.ndarray | None = None  # each validation user's recall at best_step (train.choose_margin)
    bad_epochs: int = 0
    done: bool = False
    lr_drops: list[int] = field(default_factory=list)  # steps after which the rate was decayed
    ranks: distributed.Ranks = distributed.Ranks()
    ddp: torch.nn.Module | None = None  # the model under DistributedDataParallel (torchrun, N > 1)
    id_grad: tuple[torch.Tensor, torch.Tensor] | None = None  # dense_id_grad's buffer, rows written last

    def distribute(self, ranks: distributed.Ranks) -> None:
        """Run the model under DDP across the launched processes (nothing on one process)."""
        self.ranks = ranks
        if ranks.world > 1:
            self.model.items.sparse_id_grad = False  # DDP reduces dense gradients
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model)

    @classmethod
    def fresh(cls, cfg: RunConfig, sizes: dict, id_tables: tuple[np.ndarray, np.ndarray] | None = None,
              positives: np.ndarray | None = None, time: TimeFields | None = None) -> TrainState:
        """A new model and optimiser; positives (n_pins,): each pin's training positives, for
        model.pin_id_min_count (pretrained ID tables are left whole); time: the time term's fields,
        for model.time_prior."""
        if cfg.model.time_prior and cfg.model.time_dim < 1:
            raise EbrError("model.time_prior starts the time term as a prior: it needs model.time_dim >= 1")
        model = TwoTower(sizes, cfg.model)
        if cfg.model.time_prior and time is not None:
            model.init_time_prior([None if p is None else torch.from_numpy(p) for p in time.popularity_prior()])
        if id_tables is not None:  # pretrained IDs: frozen ones are left out of the optimiser
            model.load_id_tables(*map(torch.from_numpy, id_tables), frozen=cfg.model.id_embeddings == "frozen")
        elif positives is not None and cfg.model.pin_id_min_count > 1:
            model.items.share_rare_ids(torch.from_numpy(positives), cfg.model.pin_id_min_count)
        t = cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay,
                               **({"fused": True} if t.fused_adam else {"foreach": False}))
        model.items.sparse_id_grad = True  # dense_id_grad turns it into Adam's dense gradient
        return cls(model, opt,
                   FrequencyEstimator(t.estimator_buckets, t.estimator_hashes, t.estimator_alpha, seed=t.seed))

    def dense_id_grad(self) -> None:
        """The pin-ID table's sparse gradient (the batch's rows) -> the dense gradient Adam reads,
        written into one buffer kept across steps: only last step's rows are zeroed, so no (n_pins,
        dim) tensor is allocated, page-faulted and zeroed per step. Same values as the dense
        backward (duplicate rows summed in order); Adam is unchanged."""
        table = self.model.items.id
        g = None if table is None else table.weight.grad
        if g is None or not g.is_sparse:
            return
        buf, last = self.id_grad if self.id_grad is not None else (torch.zeros(g.shape, dtype=g.dtype), None)
        if last is not None:
            buf.index_fill_(0, last, 0.0)
        rows = g._indices()[0]
        buf.index_add_(0, rows, g._values())
        self.id_grad = (buf, rows)
        table.weight.grad = buf

    def load(self, state: dict, given_validation: str | None = None, history_as_of: str | None = None,
             timed: bool = True) -> None:
        """Resume from a 'last' checkpoint; given_validation: the run's resolved data.given_validation
        (None: not a given split), history_as_of: its resolved features.history_as_of (end or
        example; None: not checked), which the checkpoint's must match; timed: whether the data has
        real time (how `auto` resolved for a checkpoint that does not record it)."""
        if "C" not in state.get("estimator", {}):
            raise EbrError("this checkpoint predates the current logQ estimator (no sighting counts); it cannot be "
                           "resumed exactly: start the run again without --resume")
        saved_gv = state.get("given_validation", "random")  # saved before the setting: always random
        if given_validation is not None and saved_gv != given_validation:
            raise EbrError(f"this checkpoint was trained with a {saved_gv} validation and its settings now resolve "
                           f"{given_validation} (data.given_validation; checkpoints saved before it were random): it "
                           "cannot be resumed exactly: start the run again without --resume (a resume keeps the "
                           "checkpoint's settings)")
        # not recorded (saved before this check): the saved setting as it resolved then (auto: end on
        # data without time); none at all (saved before the setting): point in time
        raw = state.get("config", {}).get("features", {}).get("history_as_of")
        saved_h = state.get("history_as_of") or (raw if raw in ("end", "example") else
                                                 "end" if raw == "auto" and not timed else "example")
        if history_as_of is not None and saved_h != history_as_of:
            raise EbrError(f"this checkpoint was trained on histories read as of each {saved_h} and its settings "
                           f"now resolve {history_as_of} (features.history_as_of): it cannot be resumed exactly: "
                           "start the run again without --resume (a resume keeps the checkpoint's settings)")
        pos = self.model.user.history.position
        saved, now = state.get("sizes", {}).get("history_positions", 0), 0 if pos is None else pos.shape[0]
        if saved != now:  # (a checkpoint saved before model.history_position has none)
            raise EbrError(f"this checkpoint embeds {saved} history positions and this run {now} "
                           "(model.history_position; checkpoints saved before it embed none): it cannot be resumed "
                           "exactly: start the run again without --resume")
        saved_gap, now_gap = bool(state.get("sizes", {}).get("user_gap")), self.model.user_gap
        if saved_gap != now_gap:  # (a checkpoint saved before features.user_gap reads none)
            raise EbrError(f"this checkpoint's user tower reads {'a' if saved_gap else 'no'} time since the last "
                           f"engagement and this run's {'does' if now_gap else 'does not'} (features.user_gap; "
                           "checkpoints saved before it read none): it cannot be resumed exactly: start the run "
                           "again without --resume")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.est.load_state_dict(state["estimator"])
        torch.set_rng_state(state["torch_rng"])
        for k in ("epoch", "pos_in_epoch", "step", "best", "bad_epochs", "done"):
            setattr(self, k, state[k])
        self.best_step = state.get("best_step", 0)
        saved_users = state.get("best_users")  # (a checkpoint saved before train.choose_margin has none)
        self.best_users = None if saved_users is None else saved_users.numpy()
        self.lr_drops = list(state.get("lr_drops", []))

    def save(self, path: Path, cfg: RunConfig, d: TrainData, full: bool = False, extra: dict | None = None) -> None:
        """Write a checkpoint atomically (rank 0 only: the ranks hold the same model)."""
        if self.ranks.main:
            _save(path, {**self.checkpoint(cfg, d, full), **(extra or {})})

    def checkpoint(self, cfg: RunConfig, d: TrainData, full: bool) -> dict:
        """The 'best' checkpoint (model, config, feature state) or, with full, the 'last' one."""
        base = {"model": self.model.state_dict(), "config": cfg.model_dump(), "sizes": d.sizes,
                "feature_state": d.fs.to_dict(), "epoch": self.epoch, "step": self.step, "best": self.best,
                "split": d.split_name, "given_validation": d.given_validation,
                "history_as_of": _as_of(cfg, d), "created_at": now_utc().isoformat()}
        if not full:
            return base
        return {**base, "optimizer": self.opt.state_dict(), "estimator": self.est.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "pos_in_epoch": self.pos_in_epoch, "bad_epochs": self.bad_epochs, "done": self.done,
                "best_step": self.best_step, "lr_drops": self.lr_drops,
                **({} if self.best_users is None else {"best_users": torch.from_numpy(self.best_users)})}

    def decay_lr(self, factor: float) -> None:
        """Multiply every parameter group's learning rate by `factor` and record the step."""
        for g in self.opt.param_groups:
            g["lr"] *= factor
        self.lr_drops.append(self.step)


@dataclass
class Batch:
    """The tensors of one step, assembled from the examples `idx` (the global batch) alone: a pure
    function of (data, config, idx, step, ranks), so the next batch can be assembled in a worker
    thread while the current step runs (`prefetched`)."""

    idx: np.ndarray
    off: int  # this rank's rows: idx[off: off + size]; every rank's positives are columns
    size: int
    sizes: list[int]
    ub: UserBatch
    pos: torch.Tensor  # (B,) every rank's positives
    negs: torch.Tensor | None  # mixed negatives (train.mixed_negatives), drawn from (seed, step)
    local_pins: torch.Tensor  # this rank's positives [+ negatives]: the pins the pin tower embeds
    stats: torch.Tensor | None
    buckets: torch.Tensor | None  # (size, columns, F) time-term buckets, each row as of its time
    weight: torch.Tensor
    distinct: tuple[torch.Tensor, torch.Tensor]  # the model's (uniq, inv) of [history codes, local_pins]


def history_at_end(cfg: RunConfig, ordered: bool) -> bool:
    """Whether training histories are read as of the end of the visible data (features.history_as_of;
    auto: where each user's events have no known order, i.e. data without real time other than a
    given split whose lines are in engagement order: TrainData.ordered)."""
    return cfg.features.history_as_of == "end" or (cfg.features.history_as_of == "auto" and not ordered)


def _as_of(cfg: RunConfig, d: TrainData) -> str:
    """The resolved features.history_as_of of a run on d: end or example."""
    return "end" if history_at_end(cfg, d.ordered) else "example"


def history_positions(cfg: RunConfig, ordered: bool, split_kind: str) -> bool:
    """Whether the user tower embeds each history slot's position (model.history_position). `auto`:
    where the split asks for each user's next engagements (leave_last_out; a given split whose
    lines are in engagement order, its test each user's last rows) and training histories are read
    at each example's time, so a slot's position is how recent the event is before the target.
    Not under a temporal split (a window of future engagements to predict: validation recall fell
    on the synthetic world), nor where histories are read at the end of the data (a slot's
    position then says nothing about the row's target; on sorted files nothing)."""
    mode = cfg.model.history_position
    per_user = split_kind == "leave_last_out" or (split_kind == "given" and ordered)
    return mode == "on" or (mode == "auto" and per_user and not history_at_end(cfg, ordered))


def user_gap(cfg: RunConfig, timed: bool, split_kind: str) -> bool:
    """Whether the user tower reads the time since the user's last engagement (features.user_gap).
    `auto`: under a temporal split of data with timestamps, where every request of the test window
    comes after the bundle's time, as a production request comes after the index's build; not
    under leave_last_out, whose next engagements come each at its own time (a gap counted to the
    bundle's time misleads: validation recall fell from 0.62 to 0.48 on ML-100K). Data without time
    has no gaps (`on` there is an error)."""
    mode = cfg.features.user_gap
    if mode == "on" and not timed:
        raise EbrError("features.user_gap on needs engagement timestamps: this data has none "
                       "(set features.user_gap auto or off)")
    return mode == "on" or (mode == "auto" and timed and split_kind == "temporal")


def assemble(d: TrainData, cfg: RunConfig, idx: np.ndarray, step: int, ranks: distributed.Ranks) -> Batch:
    """The batch of step `step` from the examples idx: user inputs as of each example's time,
    conditions, mixed negatives and history ends (train.horizon) drawn from (seed, step) (a resumed
    run draws the same), pin statistics, time-term buckets of every column as of each row's time."""
    ex, n_pins = d.examples, d.sizes["n_pins"]
    off, size, sizes = ranks.chunk(len(idx))
    loc = idx[off: off + size]
    back = None
    if history_at_end(cfg, d.ordered):  # as evaluation reads it, without the row's own target
        ub = user_batch(ex.user[loc], np.full(size, T_MAX), d.hist, d.users, cfg.features.history_len,
                        leave_out=ex.pin[loc], gap_as_of=d.gap_as_of)
    else:
        if cfg.train.horizon > 1:  # each row's history as of one of its user's last `horizon` events
            rng = np.random.default_rng([cfg.train.seed, 0x4020, step])  # drawn for the global batch, like
            back = rng.integers(0, cfg.train.horizon, len(idx))[off: off + size]  # the conditions below
        ub = user_batch(ex.user[loc], ex.t[loc], d.hist, d.users, cfg.features.history_len, back=back,
                        gap_as_of=d.gap_as_of)
    if cfg.train.history_dropout:  # each history item left out of this row with that probability
        L = ub.hist.shape[1]  # drawn for the global batch, this rank's rows taken (one process or several: the same)
        drop = np.random.default_rng([cfg.train.seed, 0xD0, step]).random((len(idx), L))[off: off + size]
        drop = drop < cfg.train.history_dropout
        ub.hist.masked_fill_(torch.from_numpy(drop), 0)
        ub.actions.masked_fill_(torch.from_numpy(drop), 0)
    pos = torch.from_numpy(ex.pin[idx])
    if cfg.model.conditional:
        rng = np.random.default_rng([cfg.train.seed, 0xC0D, step])
        cond = draw_conditions(ex.cond[idx], d.pins.interests[pos].numpy(), cfg.train.condition_source,
                               cfg.train.condition_dropout, rng)
        ub.condition = torch.from_numpy(cond[off: off + size])
    negs = None
    if cfg.train.mixed_negatives:
        rng = np.random.default_rng([cfg.train.seed, 0x4E6, step])
        negs = torch.from_numpy(rng.integers(FIRST_ID, n_pins, cfg.train.mixed_negatives, dtype=np.int64))
    pos_loc = pos[off: off + size]
    local_pins = pos_loc if negs is None else torch.cat([pos_loc, negs])
    pin_t = ex.t[loc] if negs is None else np.r_[ex.t[loc], np.full(len(negs), int(np.median(ex.t[idx])))]
    columns = pos if negs is None else torch.cat([pos, negs])
    buckets = d.time_buckets(columns.numpy(), ex.t[loc])
    if buckets is not None and d.time.has_age:  # a positive exists at its own row's time
        rows, own_col = torch.arange(size), torch.arange(size) + off
        own = buckets[rows, own_col, 0]
        buckets[rows, own_col, 0] = torch.where(own == NOT_YET, NOT_YET + 1, own)
    uniq, inv = np.unique(np.concatenate([ub.hist.numpy().ravel(), local_pins.numpy()]), return_inverse=True)
    return Batch(idx, off, size, sizes, ub, pos, negs, local_pins, d.pin_stats(local_pins.numpy(), pin_t), buckets,
                 torch.from_numpy(ex.weight[loc]), (torch.from_numpy(uniq), torch.from_numpy(inv.reshape(-1))))


def prefetched(make: Callable[..., Batch], args: Iterable[tuple]) -> Iterator[Batch]:
    """make(*a) for each a of args, in order, the next one built in a worker thread while the
    caller uses the current one (NumPy and PyTorch release the GIL in their kernels). Leaving the
    loop early waits for the one batch in flight."""
    with ThreadPoolExecutor(1, thread_name_prefix="ebr-batches") as pool:
        pending = None
        for a in args:
            nxt = pool.submit(make, *a)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def same_user_columns(d: TrainData, b: Batch) -> torch.Tensor:
    """(rows of this rank, global batch) bool: the columns whose positive belongs to the row's user."""
    users = torch.from_numpy(d.examples.user[b.idx])
    return users[b.off: b.off + b.size, None] == users[None, :]


def train_step(s: TrainState, d: TrainData, cfg: RunConfig, idx: np.ndarray, exact_log_q: torch.Tensor,
               clock: Stages | None = None, batch: Batch | None = None) -> float:
    """One optimiser step on the examples `idx` (the global batch; `batch`: assembled already, by
    `assemble(d, cfg, idx, s.step, s.ranks)`); returns the batch loss. Under torchrun each rank
    embeds its chunk of the rows and the positives are gathered as every rank's columns
    (train/distributed.py); on one process the chunk is the whole batch. A `clock` gets the step's
    split: assembly (when not given), forward (towers, logQ, time term, loss), backward, optimizer
    (benchmarks/train_throughput.py prints it)."""
    b = assemble(d, cfg, idx, s.step, s.ranks) if batch is None else batch
    mark(clock, "assembly")
    n_pins, pos, negs, size, off = d.sizes["n_pins"], b.pos, b.negs, b.size, b.off
    s.est.update(pos, s.step)
    log_q = neg_lq = None
    if cfg.train.logq:
        log_q = s.est.log_prob(pos) if cfg.train.logq_estimator == "streaming" else exact_log_q[pos]
        if negs is not None:
            neg_lq = torch.full((len(negs),), math.log(len(negs) / (n_pins - FIRST_ID)))
    ub, buckets = b.ub, b.buckets
    forward = s.ddp if s.ddp is not None else s.model
    q, v = forward(ub.hist, ub.rest(), b.local_pins, d.pins.take, b.stats, b.distinct)
    if isinstance(q, tuple):  # multi-embedding: only the embedding nearest the row's target is trained
        q = nearest_embedding(q[0], q[1], v[:size].detach())
    extra = None
    if buckets is not None:  # every pin read as of each row's time; one that does not exist yet is no negative
        extra = s.model.time_logits(q, buckets) / cfg.model.temperature
        if d.time.has_age:
            extra = extra.masked_fill(buckets[..., 0] == NOT_YET, float("-inf"))
    u = q[:, : s.model.score_dim]
    loss = sampled_softmax_logq(u, distributed.gather_rows(v[:size], b.sizes), pos, log_q, cfg.model.temperature,
                                b.weight, v[size:] if negs is not None else None, negs,
                                neg_lq, extra, row_offset=off, norm=len(b.idx),
                                exclude=same_user_columns(d, b) if cfg.train.mask_same_user else None)
    mark(clock, "forward")
    s.opt.zero_grad(set_to_none=True)
    (loss * s.ranks.world).backward()  # DDP averages the ranks' gradients: this makes it their sum
    s.dense_id_grad()
    mark(clock, "backward")
    s.opt.step()
    mark(clock, "optimizer")
    return distributed.all_sum(float(loss.detach()))


REFIT = "refit"  # the phase after model selection: training + validation, the selected number of steps


DEFAULT_EPOCHS = 8


def epoch_cap(cfg: RunConfig, n_examples: int) -> int:
    """train.epochs; unset: 8, raised on small data until the epochs allow train.min_steps steps."""
    if cfg.train.epochs is not None:
        return cfg.train.epochs
    per_epoch = max(math.ceil(n_examples / cfg.train.batch_size), 1)
    return max(DEFAULT_EPOCHS, math.ceil(cfg.train.min_steps / per_epoch))


def fit(s: TrainState, d: TrainData, cfg: RunConfig, rdir: Path, progress: bool = True,
        phase: str = "select", max_steps: int | None = None,
        on_epoch: Callable[[int, float], None] | None = None, lr_drops: Iterable[int] = ()) -> float:
    """Epochs of train_step and checkpoints; returns seconds spent. Phase "select": validation
    recall per epoch, early stopping, checkpoints best.pt/last.pt; at an epoch's end without a better
    recall the rate decays (train.lr_plateau_factor). Phase REFIT: no validation, `max_steps`
    steps, the rate decayed after each step of `lr_drops` (the selection's), checkpoints refit.pt
    (at the end) / refit_last.pt."""
    ck = rdir / "checkpoints"
    select = phase != REFIT
    last_name = "last.pt" if select else "refit_last.pt"
    max_steps = cfg.train.max_steps if select else max_steps
    ex, B = d.examples, cfg.train.batch_size
    n = len(ex.user)
    exact_log_q = inclusion_log_prob(d.positives(), B)
    fail_at = int(os.environ.get("EBR_FAIL_AT_STEP", "0")) or None
    if os.environ.get("EBR_FAIL_PHASE", "select") != phase:
        fail_at = None
    t_start, seen = time.time(), 0
    epochs, per_epoch = epoch_cap(cfg, n), max(math.ceil(n / B), 1)
    if not select and max_steps:  # the refit's epochs hold every selected step
        epochs = max(epochs, math.ceil(max_steps / per_epoch))
    k = cfg.train.first_epoch_checks if select else 0
    early = {round(per_epoch * i / (k + 1)) for i in range(1, k + 1)} - {0, per_epoch}
    factor, replay = cfg.train.lr_plateau_factor, set(lr_drops) if not select else set()

    def check(rec: dict, epoch_end: bool) -> bool:
        """Validation recall into rec; best, best_step and (at an epoch's end) patience updated."""
        users = validation_recalls(s.model, d, cfg.features.history_len)
        recall = float(users.mean()) if len(users) else float("nan")
        improved = recall > s.best
        bad = epoch_end and not improved and s.epoch > 0  # the first epoch is never a bad one
        if improved:
            s.best, s.bad_epochs, s.best_step, s.best_users = recall, 0, s.step, users
        elif bad:
            s.bad_epochs += 1
        rec[f"val_recall@{VAL_K}"] = recall
        if epoch_end and s.step >= cfg.train.stop_after_steps:  # before it a dip is no plateau
            if s.bad_epochs >= cfg.train.patience:
                s.done = True
            elif bad and factor < 1.0 and not s.done:
                s.decay_lr(factor)
        return improved

    def record(rec: dict) -> None:
        if s.ranks.main:
            with open(rdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    s.model.train()
    while not s.done and s.epoch < epochs:
        perm = epoch_order(ex, B, cfg.train.seed, s.epoch, cfg.train.time_local_batches)
        pbar = bar(per_epoch, f"{'' if select else 'refit '}epoch {s.epoch + 1}/{epochs}", progress,
                   initial=s.pos_in_epoch // B, unit="step")
        loss_sum, loss_n, t_epoch = 0.0, 0, time.time()
        first = s.step + 1  # this epoch's remaining steps, each batch assembled while the one before trains
        steps = [(perm[p: p + B], first + i, s.ranks) for i, p in enumerate(range(s.pos_in_epoch, n, B))]
        for batch in prefetched(partial(assemble, d, cfg), steps):
            idx = batch.idx
            s.step += 1
            if fail_at is not None and s.step == fail_at:
                raise InjectedFailure(f"injected failure at step {s.step} of {phase} (EBR_FAIL_AT_STEP)")
            loss = train_step(s, d, cfg, idx, exact_log_q, batch=batch)
            if s.step in replay:
                s.decay_lr(factor)
            s.pos_in_epoch += len(idx)
            seen += len(idx)
            loss_sum += loss * len(idx)
            loss_n += len(idx)
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", ex_s=f"{seen / (time.time() - t_start):,.0f}")
            if max_steps and s.step >= max_steps:
                s.done = True
                break
            if s.epoch == 0 and s.step in early:  # a validation inside the first epoch
                rec = {"phase": phase, "epoch": round(s.pos_in_epoch / n, 3), "step": s.step,
                       "loss": loss_sum / loss_n, "within_epoch": True}
                if check(rec, epoch_end=False):
                    s.save(ck / "best.pt", cfg, d)
                    if progress:
                        log.info("step %d (%.0f%% of epoch 1): val recall@%d %.4f  (best)", s.step,
                                 100 * rec["epoch"], VAL_K, rec[f"val_recall@{VAL_K}"])
                record(rec)
            if s.step % cfg.train.checkpoint_every == 0:
                s.save(ck / last_name, cfg, d, full=True)
        pbar.close()
        epoch_done = s.pos_in_epoch >= n
        rec = {"phase": phase, "epoch": s.epoch + 1, "step": s.step, "loss": loss_sum / max(loss_n, 1),
               "epoch_seconds": round(time.time() - t_epoch, 2),
               "examples_per_s": round(loss_n / max(time.time() - t_epoch, 1e-9), 1)}
        improved = False
        if select:
            improved = check(rec, epoch_end=True)
        record(rec)
        if progress:
            log.info("%sepoch %d: loss %.4f%s", "" if select else "refit ", s.epoch + 1, rec["loss"],
                     f"  val recall@{VAL_K} {rec[f'val_recall@{VAL_K}']:.4f}{'  (best)' if improved else ''}"
                     if select else "")
        if improved:
            s.save(ck / "best.pt", cfg, d)
        if select and on_epoch is not None:
            on_epoch(s.epoch + 1, rec[f"val_recall@{VAL_K}"])
        if epoch_done:
            s.epoch, s.pos_in_epoch = s.epoch + 1, 0
        if not select and (s.done or s.epoch >= epochs):
            s.save(ck / "refit.pt", cfg, d, extra={"refit": True})
        s.save(ck / last_name, cfg, d, full=True)
    return time.time() - t_start


def _train(ws: Workspace, cfg: RunConfig, run: str, resume: bool, progress: bool,
           on_epoch: Callable[[int, float], None] | None = None,
           ranks: distributed.Ranks = distributed.Ranks()) -> dict:
    rdir = ws.run_dir(run)
    last_path = rdir / "checkpoints" / "last.pt"
    state, fs = None, None
    if resume:
        if not last_path.exists():
            raise EbrError(f"--resume: run {run!r} has no checkpoint to resume; start it without --resume")
        state = load_checkpoint_state(last_path)
        saved = RunConfig.model_validate(state["config"])
        ignored = _ignored_settings(cfg, saved)
        if ignored:
            log.warning("--resume keeps the checkpoint's settings; ignored: %s", "; ".join(ignored))
        cfg = saved
        fs = FeatureState.from_dict(json.loads((rdir / "feature_state.json").read_text()))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    t_prep = time.time()
    d = prepare(ws, cfg, fs)
    prep_s = time.time() - t_prep
    for key, on in (("recency_half_life_days", cfg.train.recency_half_life_days is not None),
                    ("first_day_weight", cfg.train.first_day_weight != 1.0)):
        if on and not d.timed:
            log.warning("train.%s ignored: split %r has no real time (pseudo-time is no age)", key, d.split_name)
    if cfg.model.time_prior and (d.time is None or d.time.counts is None):
        log.warning("model.time_prior ignored: split %r gives the model no recent engagement counts "
                    "(features.pin_counts, data with real time)", d.split_name)
    if cfg.train.horizon > 1 and history_at_end(cfg, d.ordered):
        log.warning("train.horizon ignored: training histories are read at the end of the visible data "
                    "(features.history_as_of %s on split %r)", cfg.features.history_as_of, d.split_name)
    if d.id_snapshot is not None:  # the refit and a resume use the same snapshot
        cfg = cfg.model_copy(deep=True)
        cfg.train.id_snapshot = d.id_snapshot["name"]
        if d.id_overlap:
            log.warning("ID snapshot %s overlaps the retrieval training window: its IDs saw these labels "
                        "(--allow-overlap, for ablations)", d.id_snapshot["name"])
    ck = rdir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    if not resume and ranks.main:
        for stale in ("refit.pt", "refit_last.pt"):  # a refit of an earlier run of this name
            (ck / stale).unlink(missing_ok=True)
        (rdir / "config.yaml").write_text(cfg.to_yaml())
        (rdir / "feature_state.json").write_text(json.dumps(d.fs.to_dict()))
        (rdir / "metrics.jsonl").write_text("")
    s = TrainState.fresh(cfg, d.sizes, d.id_tables, d.positives(), d.time)
    if state is not None:
        s.load(state, d.given_validation, _as_of(cfg, d), d.timed)
    s.distribute(ranks)
    seconds = fit(s, d, cfg, rdir, progress, on_epoch=on_epoch)
    choice = None
    alternatives = _alternatives(cfg, d.sizes, d.timed)
    if alternatives:  # train.choose_*: the same selection with other settings, the best one kept
        scores, rng_after, paired = {BASE: s.best}, {BASE: torch.get_rng_state()}, {}
        win, win_cfg, win_dir = s, cfg, None
        for name, alt in alternatives:
            torch.manual_seed(cfg.train.seed)
            adir = rdir / "alternatives" / name
            (adir / "checkpoints").mkdir(parents=True, exist_ok=True)
            da = _weighted(d, alt.train)
            a = TrainState.fresh(alt, da.sizes, da.id_tables, da.positives(), da.time)
            alast = adir / "checkpoints" / "last.pt"
            if resume and alast.exists():
                a.load(load_checkpoint_state(alast), d.given_validation, _as_of(alt, d), d.timed)
            elif ranks.main:
                (adir / "metrics.jsonl").write_text("")
            a.distribute(ranks)
            if progress:
                log.info("selection with %s (%s)", name, _overrides(cfg, alt))
            seconds += fit(a, da, alt, adir, progress, phase=f"select-{name}")
            scores[name], rng_after[name] = a.best, torch.get_rng_state()
            paired[name] = paired_gain(a.best_users, s.best_users, len(d.val.users))  # s: the run's own settings
            if beats(paired[name], cfg.train.choose_margin) and a.best > win.best:
                win, win_cfg, win_dir = a, alt, adir
        chosen = BASE if win_dir is None else win_dir.name
        choice = {f"val_recall@{VAL_K}": scores, "chosen": chosen, "settings": _overrides(cfg, win_cfg),
                  "paired": paired, "margin": cfg.train.choose_margin}
        if progress:
            log.info("validation recall@%d: %s; %s kept", VAL_K,
                     ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), chosen)
        if win_dir is not None:  # the run is now the chosen alternative: its best checkpoint and config
            if ranks.main:
                if (win_dir / "checkpoints" / "best.pt").exists():  # (a resumed run promoted it already)
                    os.replace(win_dir / "checkpoints" / "best.pt", ck / "best.pt")
                tmp = rdir / "config.yaml.tmp"
                tmp.write_text(win_cfg.to_yaml())
                os.replace(tmp, rdir / "config.yaml")
            s, cfg = win, win_cfg
        torch.set_rng_state(rng_after[chosen])  # the refit starts where the chosen run's would have alone
    summary = {"run": run, "best_val_recall@100": s.best, "selected_step": s.best_step, "steps": s.step,
               "epochs": s.epoch, "train_examples": len(d.examples.user), "prep_seconds": round(prep_s, 2),
               "train_seconds": round(seconds, 2), "split": d.split_name, "served": "best.pt",
               # the choices made from the data: training histories, history positions, the epoch cap
               "history_as_of": _as_of(cfg, d),
               "history_positions": d.history_positions > 0,
               "user_gap": d.user_gap,
               "epoch_cap": epoch_cap(cfg, len(d.examples.user))}
    if d.given_validation is not None:  # data.given_validation as resolved from the lines' order
        summary["given_validation"] = d.given_validation
        if d.line_order is not None:
            summary["line_order"] = d.line_order
    if s.lr_drops:
        summary["lr_drops"] = s.lr_drops
    if choice is not None:
        summary["choice"] = choice
    if d.id_snapshot is not None:
        m = d.id_snapshot
        summary["id_embeddings"] = {"mode": cfg.model.id_embeddings, "snapshot": m["name"], "dim": m["dim"],
                                    "content_hash": m["content_hash"], "window": m["window_text"],
                                    "overlaps_training_window": d.id_overlap, "dropout": cfg.model.id_dropout}
    if ranks.world > 1:
        summary["processes"] = ranks.world
    if cfg.train.refit and s.best_step > 0:
        summary.update(_refit(ws, cfg, d.fs, rdir, s.best_step, resume, progress, ranks, s.lr_drops))
    if ranks.main:
        write_json(rdir / "summary.json", summary)
    return summary


BASE = "base"  # the run's own settings, among train.choose_*'s alternatives


def paired_gain(alt: np.ndarray | None, base: np.ndarray | None, n_val: int) -> dict[str, float | None]:
    """An alternative's validation gain over the run's own settings, user by user: the mean of the
    per-user recall differences and its standard error (sample std, ddof 1, over sqrt(n)); None
    for what cannot be measured (no validation user: no gain; one: no error)."""
    if n_val == 0:
        return {"diff": None, "se": None}
    if alt is None or base is None:
        raise EbrError("a selection of this run has no per-user validation record (a checkpoint saved before "
                       "train.choose_margin): start the run again without --resume")
    diff = alt - base
    return {"diff": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None}


def beats(gain: dict[str, float | None], margin: float) -> bool:
    """Whether a paired gain passes train.choose_margin: above margin standard errors; margin 0:
    any gain; without an error (one validation user) only margin 0 can pass."""
    if gain["diff"] is None:
        return False
    if margin == 0:
        return gain["diff"] > 0
    return gain["se"] is not None and gain["diff"] > margin * gain["se"]


def _alternatives(cfg: RunConfig, sizes: dict, timed: bool) -> list[tuple[str, RunConfig]]:
    """The settings selection also tries (train.choose_pin_id: without pin IDs; train.choose_recency_days:
    each recency half-life, on data with real time; train.choose_regularised: config.REGULARISED, on
    ids-only data): every combination other than the run's own, as (name, config) in a fixed order.
    No pin-ID choice where it is off, IDs are off already or pretrained, or pins have no other
    field to learn from (ids-only data: there the regularised choice, when on)."""
    t = cfg.train
    pin_ids, ids_only = [True], False
    if (t.choose_pin_id or t.choose_regularised) and cfg.model.use_pin_id and cfg.model.id_embeddings == "none":
        no_ids = cfg.model_copy(deep=True)
        no_ids.model.use_pin_id = False
        try:
            with torch.random.fork_rng():  # a probe: its parameter init must not move the run's RNG
                TwoTower(sizes, no_ids.model)
            pin_ids += [False] if t.choose_pin_id else []
        except ValueError:  # the item encoder would have no field
            ids_only = True
    own = t.recency_half_life_days
    half_lives = [own] + ([h for h in dict.fromkeys(t.choose_recency_days) if h != own] if timed else [])
    neg, drop = REGULARISED["train.mixed_negatives"], REGULARISED["model.dropout"]
    own_reg = t.mixed_negatives == neg and cfg.model.dropout == drop
    regs = [False] + ([True] if ids_only and t.choose_regularised and not own_reg else [])
    out = []
    for ids in pin_ids:
        for h in half_lives:
            for reg in regs:
                if ids and h == own and not reg:
                    continue
                alt = cfg.model_copy(deep=True)
                alt.model.use_pin_id, alt.train.recency_half_life_days = ids, h
                if reg:
                    alt.train.mixed_negatives, alt.model.dropout = neg, drop
                alt.train.choose_pin_id, alt.train.choose_recency_days, alt.train.choose_regularised = False, [], False
                parts = ([] if ids else ["no_pin_id"]) + ([] if h == own else [
                    f"recency_{h:g}d" if h is not None else "no_recency"]) + (["regularised"] if reg else [])
                out.append(("_".join(parts), alt))
    return out


def _overrides(cfg: RunConfig, alt: RunConfig) -> dict:
    """The settings an alternative changes (dotted keys), choose_* themselves left out."""
    out = {}
    for sec in ("model", "train"):
        x, y = getattr(cfg, sec).model_dump(), getattr(alt, sec).model_dump()
        out.update({f"{sec}.{k}": y[k] for k in x if x[k] != y[k] and not k.startswith("choose_")})
    return out


def _weighted(d: TrainData, t: TrainConfig) -> TrainData:
    """d with its examples weighted: the action weights, times recency_weights for a recency
    half-life (train.recency_half_life_days, on data with real time), times user_weights for
    train.user_weight_power, times first_day_weights for train.first_day_weight (real time only)."""
    w = d.action_weight
    if t.recency_half_life_days is not None and d.timed:
        w = w * recency_weights(d.examples.t, d.as_of, t.recency_half_life_days)
    if t.user_weight_power:
        w = w * user_weights(d.examples.user, t.user_weight_power)
    if t.first_day_weight != 1.0 and d.timed:
        w = w * first_day_weights(d.examples.user, d.examples.t, t.first_day_weight)
    return replace(d, examples=replace(d.examples, weight=w))


def _refit(ws: Workspace, cfg: RunConfig, fs: FeatureState, rdir: Path, steps: int, resume: bool,
           progress: bool, ranks: distributed.Ranks = distributed.Ranks(), lr_drops: Iterable[int] = ()) -> dict:
    """Retrain from scratch on training + validation for the selected number of steps, as a
    production pipeline does once validation has chosen the budget: the most recent data is then
    in the model. Bundles serve refit.pt; best.pt (the selected model) is kept."""
    t0 = time.time()
    rd = prepare(ws, cfg, fs, refit=True)
    r = TrainState.fresh(cfg, rd.sizes, rd.id_tables, rd.positives(), rd.time)
    last = rdir / "checkpoints" / "refit_last.pt"
    if resume and last.exists():
        r.load(load_checkpoint_state(last), rd.given_validation, _as_of(cfg, rd), rd.timed)
    r.distribute(ranks)
    if progress:
        log.info("refit: %d steps on training + validation (%s examples)", steps, f"{len(rd.examples.user):,}")
    seconds = fit(r, rd, cfg, rdir, progress, phase=REFIT, max_steps=steps, lr_drops=lr_drops)
    return {"served": "refit.pt", "refit": {"steps": r.step, "examples": len(rd.examples.user), "lr_drops": r.lr_drops,
                                            "seconds": round(time.time() - t0, 2), "train_seconds": round(seconds, 2)}}
