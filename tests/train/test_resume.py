"""A run killed at a fixed step and resumed gives the same weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.train.loop import train
from tests.conftest import crash_at

CFG = {"train.epochs": 2, "train.batch_size": 256, "train.checkpoint_every": 5, "train.threads": 1,
       "train.val_users": 100, "train.patience": 5, "train.mixed_negatives": 32, "model.hidden": [64],
       "model.dropout": 0.1,
       **NO_CHOICE}  # the per-dataset choices have their own resume tests in test_choose.py


@pytest.fixture()
def single_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_resume_is_bit_for_bit(tiny_ws, monkeypatch, single_thread):
    cfg = RunConfig.load(None, CFG)
    train(tiny_ws, cfg, run="straight", progress=False)
    crashed = torch.load(crash_at(tiny_ws, cfg, "crashed", 13, monkeypatch), weights_only=True)
    assert crashed["step"] == 10  # the last checkpoint before the failure
    summary = train(tiny_ws, cfg, run="crashed", resume=True, progress=False)
    a = torch.load(tiny_ws.run_dir("straight") / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tiny_ws.run_dir("crashed") / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == summary["steps"] > 13
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("A", "B"):
        assert torch.equal(a["estimator"][k], b["estimator"][k])
    assert a["best"] > 0  # validation recall of a trained model


def test_resume_refuses_a_checkpoint_of_other_training_histories(tiny_ws, monkeypatch, single_thread):
    """A 'last' checkpoint records the resolved features.history_as_of (end or example); resuming
    one whose settings now resolve the other (a changed auto rule) is a clear error naming the
    setting. A checkpoint that does not record it is read from its saved setting (an explicit end
    resumes where its settings still resolve end), and the same resolution resumes. Mutations
    caught: the value not saved, the check dropped, an unrecorded value read as `example` whatever
    the saved setting."""
    from ebr.errors import EbrError

    cfg = RunConfig.load(None, {**CFG, "train.epochs": 1})
    last = crash_at(tiny_ws, cfg, "hist", 7, monkeypatch)
    state = torch.load(last, weights_only=True)
    assert state["history_as_of"] == "example"  # timed data: each example's time
    state["config"]["features"]["history_as_of"] = "end"  # the saved settings now resolve `end`
    torch.save(state, last)
    with pytest.raises(EbrError, match="features.history_as_of"):
        train(tiny_ws, cfg, run="hist", resume=True, progress=False)
    del state["history_as_of"]  # not recorded: the saved `end` is what it trained with
    torch.save(state, last)
    assert train(tiny_ws, cfg, run="hist", resume=True, progress=False)["steps"] > 7


def test_resume_without_checkpoint_is_a_clear_error(tiny_ws):
    from ebr.errors import EbrError

    with pytest.raises(EbrError, match="no checkpoint"):
        train(tiny_ws, RunConfig(), run="never-started", resume=True, progress=False)


def test_refit_trains_the_selected_steps_on_validation_too_and_resumes(tiny_ws, monkeypatch, single_thread):
    """The refit trains from scratch on training + validation for the selected number of steps, the
    bundle serves it, best.pt stays, and a refit killed mid-way resumes bit for bit. Mutations
    caught: a refit on the training part only (same example count), a refit of another length
    than the selected step, bundles still built from best.pt, a refit that is not resumable."""
    from ebr.index.bundle import build_bundle, served_checkpoint
    from ebr.workspace import read_json

    cfg = RunConfig.load(None, {**CFG, "train.patience": 1, "train.epochs": 3})
    s = train(tiny_ws, cfg, run="r-straight", progress=False)
    ck = tiny_ws.run_dir("r-straight") / "checkpoints"
    assert s["served"] == "refit.pt" and (ck / "best.pt").exists() and (ck / "refit.pt").exists()
    assert s["refit"]["steps"] == s["selected_step"] > 0
    assert s["refit"]["examples"] > s["train_examples"], "the refit adds the validation part"
    refit = torch.load(ck / "refit.pt", weights_only=True)
    assert refit["refit"] and refit["step"] == s["selected_step"]
    man = read_json(build_bundle(tiny_ws, "r-straight") / "manifest.json")
    assert man["checkpoint"]["refit"] and man["checkpoint"]["path"].endswith("refit.pt")
    crash_at(tiny_ws, cfg, "r-crashed", 7, monkeypatch, phase="refit")
    train(tiny_ws, cfg, run="r-crashed", resume=True, progress=False)
    b = torch.load(tiny_ws.run_dir("r-crashed") / "checkpoints" / "refit.pt", weights_only=True)
    for k in refit["model"]:
        assert torch.equal(refit["model"][k], b["model"][k]), k
    # --no-refit serves the selected model
    s2 = train(tiny_ws, RunConfig.load(None, {**CFG, "train.refit": False}), run="r-straight", progress=False)
    assert s2["served"] == "best.pt" and not (ck / "refit.pt").exists()
    assert served_checkpoint(tiny_ws, "r-straight").name == "best.pt"


def test_the_refit_runs_every_selected_step_past_the_epoch_cap(tiny_ws, tmp_path, single_thread):
    """A refit asked for more steps than its config's epochs hold (train.epochs 1, three epochs'
    worth of steps) runs them all: the refit's epoch count is raised to hold the selected steps.
    Catches the raise dropped (the refit would stop after one epoch, serving a shorter model than
    the one selected)."""
    from ebr.train.loop import REFIT, TrainState, fit, prepare

    cfg = RunConfig.load(None, {**CFG, "train.epochs": 1})
    d = prepare(tiny_ws, cfg, refit=True)
    per_epoch = -(-len(d.examples.user) // cfg.train.batch_size)
    s = TrainState.fresh(cfg, d.sizes, d.id_tables, d.positives())
    (tmp_path / "checkpoints").mkdir()
    fit(s, d, cfg, tmp_path, progress=False, phase=REFIT, max_steps=3 * per_epoch)
    assert s.step == 3 * per_epoch and s.epoch == 3


def test_the_prefetched_loop_trains_what_in_line_steps_train(tiny_ws, tmp_path, single_thread):
    """`fit` assembles each batch in a worker thread one step ahead; its weights after 7 steps equal
    7 plain `train_step` calls assembling in line (mixed negatives and conditions are drawn from
    (seed, step), so the step number given to the worker must be the step that uses the batch).
    Catches an off-by-one step handed to the prefetched assembly, or batches out of order."""
    import numpy as np

    from ebr.train.loop import TrainState, epoch_order, fit, prepare, train_step
    from ebr.train.loss import inclusion_log_prob

    cfg = RunConfig.load(None, {**CFG, "train.max_steps": 7, "model.dropout": 0.0})
    torch.set_num_threads(1)  # train() does this for train.threads; fit is called directly here
    d = prepare(tiny_ws, cfg)
    B = cfg.train.batch_size
    torch.manual_seed(0)
    fast = TrainState.fresh(cfg, d.sizes)
    (tmp_path / "checkpoints").mkdir()
    fit(fast, d, cfg, tmp_path, progress=False)
    torch.manual_seed(0)
    plain = TrainState.fresh(cfg, d.sizes)
    plain.model.train()
    perm = epoch_order(d.examples, B, cfg.train.seed, 0, cfg.train.time_local_batches)
    log_q = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), B)
    for i in range(7):
        plain.step += 1
        train_step(plain, d, cfg, perm[i * B: (i + 1) * B], log_q)
    assert fast.step == plain.step == 7
    for (name, a), b in zip(fast.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_adam_takes_the_same_steps_as_the_per_tensor_loop(tiny_ws, single_thread):
    """train.fused_adam (the default) is a speed switch only: 7 steps with weight decay end within
    float rounding of PyTorch's per-tensor Adam. Catches the fused branch dropping an argument
    (weight decay, the learning rate) or including frozen parameters."""
    import numpy as np

    from ebr.train.loop import TrainState, epoch_order, prepare, train_step
    from ebr.train.loss import inclusion_log_prob

    torch.set_num_threads(1)
    states = []
    for fused in (True, False):
        cfg = RunConfig.load(None, {**CFG, "model.dropout": 0.0, "train.weight_decay": 0.05,
                                    "train.fused_adam": fused})
        d = prepare(tiny_ws, cfg)
        torch.manual_seed(0)
        s = TrainState.fresh(cfg, d.sizes)
        s.model.train()
        B = cfg.train.batch_size
        perm = epoch_order(d.examples, B, cfg.train.seed, 0, False)
        log_q = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), B)
        for i in range(7):
            s.step += 1
            train_step(s, d, cfg, perm[i * B: (i + 1) * B], log_q)
        states.append(s.model.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))  # two kernels
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=2e-6, rtol=1e-5), k


def test_rare_pins_share_one_id_row_in_training_refit_and_bundle(tiny_ws, single_thread):
    """model.pin_id_min_count m: a pin with fewer than m training positives reads the OOV row of the
    pin-ID table, in the selection model (counts of TRAIN), in the refit (TRAIN + VALIDATION) and in
    the bundle's item representations; the mapping persists in the checkpoint, and a checkpoint
    from before it loads with every pin its own row. Catches `<=` for `<`, the refit counting the
    selection's examples (or skipping the sharing), the mapping not saved with the model, and the
    export reading each pin's own row."""
    import numpy as np

    from ebr.features.state import OOV
    from ebr.index.bundle import build_bundle
    from ebr.model.towers import TwoTower
    from ebr.train.loop import prepare

    m = 4
    cfg = RunConfig.load(None, {**CFG, "model.pin_id_min_count": m, "train.max_steps": 3, "train.epochs": 1})
    train(tiny_ws, cfg, run="rare", progress=False)
    ck = tiny_ws.run_dir("rare") / "checkpoints"
    for name, refit in (("best.pt", False), ("refit.pt", True)):
        pos = prepare(tiny_ws, cfg, refit=refit).positives()
        row = torch.load(ck / name, weights_only=True)["model"]["items.id_row"].numpy()
        codes = np.arange(len(pos))
        want = np.where((pos < m) & (codes > OOV), OOV, codes)
        assert np.array_equal(row, want), name
        assert 0 < (row == OOV).sum() - 1 < len(row) - 2  # some pins share, some keep their own
    sel, ref = (prepare(tiny_ws, cfg, refit=r).positives() for r in (False, True))
    assert ((sel < m) != (ref < m)).any()  # the two phases' counts differ (the check above is not vacuous)
    # the bundle ships what the model computes with the shared row
    state = torch.load(ck / "refit.pt", weights_only=True)
    d = prepare(tiny_ws, cfg, refit=True)
    model = TwoTower(d.sizes, cfg.model)
    model.load_state_dict(state["model"])
    rare = int(np.flatnonzero(model.items.id_row.numpy() == OOV)[1])
    bundle = build_bundle(tiny_ws, "rare", "temporal")
    rep = np.load(bundle / "item_repr.npy")[rare, : cfg.model.id_dim]
    assert np.allclose(rep, model.items.id.weight[OOV].detach().numpy(), atol=1e-6)
    assert not np.allclose(rep, model.items.id.weight[rare].detach().numpy(), atol=1e-3)
    # a checkpoint from before the mapping: every pin its own row
    old = {k: v for k, v in state["model"].items() if k != "items.id_row"}
    model.load_state_dict(old)
    assert torch.equal(model.items.id_row, torch.arange(len(model.items.id_row)))
