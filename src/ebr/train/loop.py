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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ebr.config import RunConfig
from ebr.data.splits import Part, load_split
from ebr.errors import EbrError
from ebr.features.batches import PinInputs, user_batch
from ebr.features.examples import (
    T_MAX,
    Examples,
    Histories,
    eval_spec,
    existing_pins,
    load_engagements,
    positive_examples,
)
from ebr.features.pinstats import PinStats, group_codes
from ebr.features.state import FeatureState, build_feature_state, pin_arrays, user_arrays
from ebr.log import bar, log
from ebr.model.towers import TwoTower
from ebr.ranking import metrics_at_k, topk_masked
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
    val: object
    split_name: str
    stats: PinStats | None
    candidates: np.ndarray  # (n_pins,) bool: pins engaged with in the training part (exist at validation)

    def pin_stats(self, pins: np.ndarray, t: np.ndarray) -> torch.Tensor | None:
        return None if self.stats is None else torch.from_numpy(self.stats.at(pins, t))

    def all_stats(self) -> torch.Tensor | None:
        """Statistics of every pin code as of the end of the visible (training) data."""
        n = self.pins.cat.shape[0]
        return self.pin_stats(np.arange(n), np.full(n, T_MAX))

    @property
    def sizes(self) -> dict:
        return {**self.fs.sizes, "n_pin_stats": self.stats.width if self.stats is not None else 0}


def prepare(ws: Workspace, cfg: RunConfig, fs: FeatureState | None = None) -> TrainData:
    split = load_split(ws, cfg.data.split)
    fs = fs or build_feature_state(ws)
    e = load_engagements(ws, fs, split, seed=cfg.train.seed)
    train_visible = e.part == Part.TRAIN
    hist = Histories.build(e, len(fs.users), visible=train_visible)
    ex = positive_examples(e, cfg.features, parts=(Part.TRAIN,))
    if len(ex.user) == 0:
        raise ValueError(f"split {split.name!r} has no positive training engagements "
                         f"({', '.join(cfg.features.positive_actions)})")
    val = eval_spec(
        e,
        cfg.features,
        target_part=Part.VALIDATION,
        train_parts=(Part.TRAIN,),
        max_users=cfg.train.val_users,
        seed=cfg.train.seed,
    )
    stats = None
    if cfg.features.pin_stats:
        groups = group_codes(ws, fs, cfg.features.stats_granularity)
        stats = PinStats.build(e, groups, train_visible, cfg.features.stats_windows_days)
    return TrainData(
        fs,
        PinInputs.from_arrays(pin_arrays(ws, fs)),
        user_arrays(ws, fs),
        hist,
        ex,
        val,
        split.name,
        stats,
        existing_pins(e, train_visible, len(fs.pins)),
    )


@torch.no_grad()
def validation_recall(model: TwoTower, d: TrainData, L: int) -> float:
    spec = d.val
    if len(spec.users) == 0:
        return float("nan")
    model.eval()
    P = model.encode_all_pins(d.pins.cat, d.pins.num, d.pins.emb, d.all_stats())[1]
    allowed = torch.from_numpy(d.candidates)  # pins that exist before the validation window
    tops = []
    for lo in range(0, len(spec.users), 512):
        ub = user_batch(spec.users[lo : lo + 512], spec.t[lo : lo + 512], d.hist, d.users, L)
        u, _ = model.embed_users_and_pins(
            ub.hist, ub.actions, ub.cat, ub.condition, ub.user, torch.zeros(0, dtype=torch.int64), d.pins.take
        )
        tops.append(topk_masked(u @ P.T, VAL_K, spec.exclude[lo : lo + 512], allowed)[1].numpy())
    model.train()
    return metrics_at_k(np.concatenate(tops), spec.targets, [VAL_K])[f"recall@{VAL_K}"]


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


def train(ws: Workspace, cfg: RunConfig, run: str = "main", resume: bool = False, progress: bool = True) -> dict:
    """Train a two-tower model; returns the summary (best validation recall, steps, timings). The run
    folder is locked while training: a second `ebr train --run` of it is refused."""
    with folder_lock(ws.run_dir(run), f"run {run!r}"):
        return _train(ws, cfg, run, resume, progress)


def _train(ws: Workspace, cfg: RunConfig, run: str, resume: bool, progress: bool) -> dict:
    rdir = ws.run_dir(run)
    ck = rdir / "checkpoints"
    last_path = ck / "last.pt"
    state = None
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
    else:
        fs = None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    t_prep = time.time()
    d = prepare(ws, cfg, fs)
    prep_s = time.time() - t_prep
    ck.mkdir(parents=True, exist_ok=True)
    if not resume:
        (rdir / "config.yaml").write_text(cfg.to_yaml())
        (rdir / "feature_state.json").write_text(json.dumps(d.fs.to_dict()))
        (rdir / "metrics.jsonl").write_text("")
    sizes = d.sizes
    model = TwoTower(sizes, cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    est = FrequencyEstimator(
        cfg.train.estimator_buckets, cfg.train.estimator_hashes, cfg.train.estimator_alpha, seed=cfg.train.seed
    )
    neg_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    epoch, pos_in_epoch, step, best, bad_epochs, done = 0, 0, 0, -1.0, 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        est.load_state_dict(state["estimator"])
        torch.set_rng_state(state["torch_rng"])
        neg_gen.set_state(state["neg_rng"])
        epoch, pos_in_epoch, step = state["epoch"], state["pos_in_epoch"], state["step"]
        best, bad_epochs, done = state["best"], state["bad_epochs"], state["done"]
    fail_at = int(os.environ.get("EBR_FAIL_AT_STEP", "0")) or None

    def snapshot(kind: str) -> None:
        base = {
            "model": model.state_dict(),
            "config": cfg.model_dump(),
            "sizes": sizes,
            "feature_state": d.fs.to_dict(),
            "epoch": epoch,
            "step": step,
            "best": best,
            "split": d.split_name,
            "created_at": now_utc().isoformat(),
        }
        if kind == "best":
            _save(ck / "best.pt", base)
        else:
            _save(
                last_path,
                {
                    **base,
                    "optimizer": opt.state_dict(),
                    "estimator": est.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "neg_rng": neg_gen.get_state(),
                    "pos_in_epoch": pos_in_epoch,
                    "bad_epochs": bad_epochs,
                    "done": done,
                },
            )

    ex, L, B = d.examples, cfg.features.history_len, cfg.train.batch_size
    n = len(ex.user)
    steps_per_epoch = math.ceil(n / B)
    n_pins = sizes["n_pins"]
    exact_log_q = inclusion_log_prob(np.bincount(ex.pin, minlength=n_pins), B)
    t_start = time.time()
    seen_examples = 0
    model.train()
    while not done and epoch < cfg.train.epochs:
        perm = epoch_order(ex, B, cfg.train.seed, epoch, cfg.train.time_local_batches)
        pbar = bar(
            steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}", progress, initial=pos_in_epoch // B, unit="step"
        )
        loss_sum, loss_n, t_epoch = 0.0, 0, time.time()
        while pos_in_epoch < n:
            idx = perm[pos_in_epoch : pos_in_epoch + B]
            ub = user_batch(ex.user[idx], ex.t[idx], d.hist, d.users, L)
            pos = torch.from_numpy(ex.pin[idx])
            step += 1
            if fail_at is not None and step == fail_at:
                raise InjectedFailure(f"injected failure at step {step} (EBR_FAIL_AT_STEP)")
            est.update(pos, step)
            log_q = None
            if cfg.train.logq:
                log_q = est.log_prob(pos) if cfg.train.logq_estimator == "streaming" else exact_log_q[pos]
            negs = None
            if cfg.train.mixed_negatives:
                negs = torch.randint(2, n_pins, (cfg.train.mixed_negatives,), generator=neg_gen)
            all_pins = pos if negs is None else torch.cat([pos, negs])
            pin_t = ex.t[idx] if negs is None else np.r_[ex.t[idx], np.full(len(negs), int(np.median(ex.t[idx])))]
            u, v = model.embed_users_and_pins(
                ub.hist,
                ub.actions,
                ub.cat,
                ub.condition,
                ub.user,
                all_pins,
                d.pins.take,
                d.pin_stats(all_pins.numpy(), pin_t),
            )
            neg_lq = None
            if negs is not None and cfg.train.logq:
                neg_lq = torch.full((len(negs),), math.log(len(negs) / (n_pins - 2)))
            loss = sampled_softmax_logq(
                u,
                v[: len(pos)],
                pos,
                log_q,
                cfg.model.temperature,
                torch.from_numpy(ex.weight[idx]),
                v[len(pos) :] if negs is not None else None,
                negs,
                neg_lq,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pos_in_epoch += len(idx)
            seen_examples += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            loss_n += len(idx)
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", ex_s=f"{seen_examples / (time.time() - t_start):,.0f}")
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                done = True
                break
            if step % cfg.train.checkpoint_every == 0:
                snapshot("last")
        pbar.close()
        epoch_done = pos_in_epoch >= n
        recall = validation_recall(model, d, L)
        improved = recall > best
        if improved:
            best, bad_epochs = recall, 0
        else:
            bad_epochs += 1
        rec = {
            "epoch": epoch + 1,
            "step": step,
            "loss": loss_sum / max(loss_n, 1),
            f"val_recall@{VAL_K}": recall,
            "epoch_seconds": round(time.time() - t_epoch, 2),
            "examples_per_s": round(loss_n / max(time.time() - t_epoch, 1e-9), 1),
        }
        with open(rdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if progress:
            log.info(
                "epoch %d: loss %.4f  val recall@%d %.4f%s",
                epoch + 1,
                rec["loss"],
                VAL_K,
                recall,
                "  (best)" if improved else "",
            )
        if improved:
            snapshot("best")
        if epoch_done:
            epoch, pos_in_epoch = epoch + 1, 0
        if bad_epochs >= cfg.train.patience:
            done = True
        snapshot("last")
    summary = {
        "run": run,
        "best_val_recall@100": best,
        "steps": step,
        "epochs": epoch,
        "train_examples": n,
        "prep_seconds": round(prep_s, 2),
        "train_seconds": round(time.time() - t_start, 2),
        "split": d.split_name,
    }
    write_json(rdir / "summary.json", summary)
    return summary
