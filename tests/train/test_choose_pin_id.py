"""train.choose_pin_id: selection with and without pin IDs, the better validation recall kept."""

from __future__ import annotations

import json

import pytest
import torch

from ebr.config import RunConfig
from ebr.index.bundle import served_checkpoint
from ebr.train.loop import InjectedFailure, _without_pin_id, train

CFG = {"train.epochs": 2, "train.batch_size": 256, "train.threads": 1, "train.val_users": 200,
       "model.hidden": [64], "train.choose_pin_id": True}


@pytest.fixture()
def single_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_run_keeps_the_better_of_with_and_without_pin_ids(tiny_ws, single_thread):
    """Both selections equal standalone runs of each config (same seed); the run keeps the one with
    the better validation recall, and everything downstream follows it: summary, config.yaml, the
    selected and the refit checkpoints (a model without pin IDs has no ID table), the bundle. The
    choice goes each way once (the defaults keep the IDs on the tiny world; at lr 1e-6, barely
    trained, its validation favours the model without them). Catches the comparison reversed, the
    alternative trained with IDs (or from another seed), a promotion that leaves the other model's
    best.pt or config, a refit of the other config, and a refit whose RNG the second selection (or
    the probe that builds its model) moved: where the IDs are kept, the refit is the plain run's."""
    from ebr.index.bundle import build_bundle, load_checkpoint

    plain = {k: v for k, v in CFG.items() if k != "train.choose_pin_id"}
    with_ids = train(tiny_ws, RunConfig.load(None, plain), run="ids-alone", progress=False)["best_val_recall@100"]
    without = train(tiny_ws, RunConfig.load(None, {**plain, "model.use_pin_id": False}), run="no-ids-alone",
                    progress=False)["best_val_recall@100"]
    s = train(tiny_ws, RunConfig.load(None, CFG), run="choose", progress=False)
    c = s["pin_id_choice"]
    assert c["with_pin_id"] == pytest.approx(with_ids, abs=1e-9)
    assert c["without_pin_id"] == pytest.approx(without, abs=1e-9)
    assert c["chosen"] == ("without" if without > with_ids else "with")
    assert s["best_val_recall@100"] == max(with_ids, without)
    assert c["chosen"] == "with"  # the tiny world keeps the IDs: the whole run is the plain run's
    for ck in ("best.pt", "refit.pt"):
        x = torch.load(tiny_ws.run_dir("ids-alone") / "checkpoints" / ck, weights_only=True)["model"]
        y = torch.load(tiny_ws.run_dir("choose") / "checkpoints" / ck, weights_only=True)["model"]
        assert all(torch.equal(x[k], y[k]) for k in x), ck
    # the other side wins at lr 1e-6 (both barely trained)
    b = train(tiny_ws, RunConfig.load(None, {**CFG, "train.lr": 1e-6}), run="choose-b", progress=False)
    assert {s["pin_id_choice"]["chosen"], b["pin_id_choice"]["chosen"]} == {"with", "without"}
    for name, summ in (("choose", s), ("choose-b", b)):
        c = summ["pin_id_choice"]
        no_ids = c["chosen"] == "without"
        assert no_ids == (c["without_pin_id"] > c["with_pin_id"])
        rdir = tiny_ws.run_dir(name)
        assert RunConfig.load(rdir / "config.yaml").model.use_pin_id == (not no_ids)
        for ck in ("best.pt", "refit.pt"):
            state = torch.load(rdir / "checkpoints" / ck, weights_only=True)
            assert ("items.id.weight" in state["model"]) == (not no_ids), (name, ck)
            assert state["config"]["model"]["use_pin_id"] == (not no_ids)
        model, _ = load_checkpoint(served_checkpoint(tiny_ws, name))
        assert (model.items.id is None) == no_ids
        assert json.loads((rdir / "summary.json").read_text())["pin_id_choice"] == c
        build_bundle(tiny_ws, name, "temporal")  # the chosen model exports and indexes


def test_no_choice_without_other_pin_fields_or_with_pretrained_ids(tiny_ws):
    """Pins of an ids-only dataset have nothing but their ID: no alternative (a model without
    fields cannot be built); pretrained IDs and a switched-off setting make no choice either.
    Catches the alternative built for ids-only data (a crash) or for pretrained IDs."""
    from ebr.features.state import build_feature_state

    sizes = {**build_feature_state(tiny_ws).sizes, "interest_features": True}
    cfg = RunConfig.load(None, CFG)
    alt = _without_pin_id(cfg, sizes)
    assert alt is not None and not alt.model.use_pin_id and not alt.train.choose_pin_id
    bare = {**sizes, "pin_cat": [], "n_pin_num": 0, "emb_dim": 0, "interest_features": False}
    assert _without_pin_id(cfg, bare) is None
    assert _without_pin_id(RunConfig.load(None, {**CFG, "model.id_embeddings": "frozen"}), sizes) is None
    assert _without_pin_id(RunConfig.load(None, {**CFG, "train.choose_pin_id": False}), sizes) is None


@pytest.mark.parametrize("phase,step", [("select-no-pin-id", 12), ("refit", 3)])
def test_a_run_killed_after_the_first_selection_resumes_to_the_same_choice(tiny_ws, monkeypatch, single_thread,
                                                                            phase, step):
    """A failure injected in the second selection (phase select-no-pin-id) or in the refit after
    the model without pin IDs was promoted, then --resume: the choice, the selected checkpoint and
    the refit of the uninterrupted run (lr 1e-6, where the model without IDs wins). Catches a
    resume that promotes again (the alternative's best.pt is gone by then: a crash) and one that
    loses or reverses the first run's choice."""
    cfg = RunConfig.load(None, {**CFG, "train.checkpoint_every": 5, "train.lr": 1e-6})
    a = train(tiny_ws, cfg, run="straight-choice", progress=False)
    assert a["pin_id_choice"]["chosen"] == "without"
    run = f"crashed-{phase}"
    monkeypatch.setenv("EBR_FAIL_PHASE", phase)
    monkeypatch.setenv("EBR_FAIL_AT_STEP", str(step))
    with pytest.raises(InjectedFailure):
        train(tiny_ws, cfg, run=run, progress=False)
    monkeypatch.delenv("EBR_FAIL_AT_STEP")
    b = train(tiny_ws, cfg, run=run, resume=True, progress=False)
    assert a["pin_id_choice"] == b["pin_id_choice"]
    for ck in ("best.pt", "refit.pt"):
        x = torch.load(tiny_ws.run_dir("straight-choice") / "checkpoints" / ck, weights_only=True)["model"]
        y = torch.load(tiny_ws.run_dir(run) / "checkpoints" / ck, weights_only=True)["model"]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (ck, k)
