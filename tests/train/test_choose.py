"""train.choose_pin_id / train.choose_recency_days: selection with other settings, the best
validation recall kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.index.bundle import served_checkpoint
from ebr.train.loop import _alternatives, train
from tests.conftest import crash_at

CFG = {"train.epochs": 2, "train.batch_size": 256, "train.threads": 1, "train.val_users": 200,
       "model.hidden": [64], "train.choose_pin_id": True, "train.choose_recency_days": [],
       "features.user_gap": "off",  # the settings where the choice goes each way (see the first test)
       "train.choose_margin": 0.0}  # the best validation recall kept (the margin: test_choose_margin)


@pytest.fixture()
def single_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_run_keeps_the_better_of_with_and_without_pin_ids(tiny_ws, single_thread):
    """Both selections equal standalone runs of each config (same seed); the run keeps the one with
    the better validation recall, and everything downstream follows it: summary, config.yaml, the
    selected and the refit checkpoints (a model without pin IDs has no ID table), the bundle. The
    choice goes each way once (at lr 1e-3 the tiny world keeps the IDs; at the default lr its
    validation favours the model without them). Catches the comparison reversed, the
    alternative trained with IDs (or from another seed), a promotion that leaves the other model's
    best.pt or config, a refit of the other config, and a refit whose RNG the second selection (or
    the probe that builds its model) moved: where the IDs are kept, the refit is the plain run's."""
    from ebr.index.bundle import build_bundle, load_checkpoint

    cfg = {**CFG, "train.lr": 1e-3}
    plain = {**cfg, **NO_CHOICE}
    with_ids = train(tiny_ws, RunConfig.load(None, plain), run="ids-alone", progress=False)["best_val_recall@100"]
    without = train(tiny_ws, RunConfig.load(None, {**plain, "model.use_pin_id": False}), run="no-ids-alone",
                    progress=False)["best_val_recall@100"]
    s = train(tiny_ws, RunConfig.load(None, cfg), run="choose", progress=False)
    c = s["choice"]
    assert c["val_recall@100"]["base"] == pytest.approx(with_ids, abs=1e-9)
    assert c["val_recall@100"]["no_pin_id"] == pytest.approx(without, abs=1e-9)
    assert c["chosen"] == ("no_pin_id" if without > with_ids else "base")
    assert s["best_val_recall@100"] == max(with_ids, without)
    assert c["chosen"] == "base"  # the tiny world keeps the IDs: the whole run is the plain run's
    for ck in ("best.pt", "refit.pt"):
        x = torch.load(tiny_ws.run_dir("ids-alone") / "checkpoints" / ck, weights_only=True)["model"]
        y = torch.load(tiny_ws.run_dir("choose") / "checkpoints" / ck, weights_only=True)["model"]
        assert all(torch.equal(x[k], y[k]) for k in x), ck
    # the other side wins at the default lr
    b = train(tiny_ws, RunConfig.load(None, CFG), run="choose-b", progress=False)
    assert {s["choice"]["chosen"], b["choice"]["chosen"]} == {"base", "no_pin_id"}
    for name, summ in (("choose", s), ("choose-b", b)):
        c = summ["choice"]
        no_ids = c["chosen"] == "no_pin_id"
        assert no_ids == (c["val_recall@100"]["no_pin_id"] > c["val_recall@100"]["base"])
        assert c["settings"] == ({"model.use_pin_id": False} if no_ids else {})
        rdir = tiny_ws.run_dir(name)
        assert RunConfig.load(rdir / "config.yaml").model.use_pin_id == (not no_ids)
        for ck in ("best.pt", "refit.pt"):
            state = torch.load(rdir / "checkpoints" / ck, weights_only=True)
            assert ("items.id.weight" in state["model"]) == (not no_ids), (name, ck)
            assert state["config"]["model"]["use_pin_id"] == (not no_ids)
        model, _ = load_checkpoint(served_checkpoint(tiny_ws, name))
        assert (model.items.id is None) == no_ids
        assert json.loads((rdir / "summary.json").read_text())["choice"] == c
        build_bundle(tiny_ws, name, "temporal")  # the chosen model exports and indexes


def test_which_alternatives_are_tried(tiny_ws):
    """Every combination of the choices other than the run's own, in a fixed order, each with the
    choices switched off; no pin-ID alternative for ids-only pins (a model without fields cannot be
    built), pretrained IDs or the setting off; no recency alternative on data without real time,
    none for the run's own half-life, a repeated one tried once. Catches the alternative built for
    ids-only data (a crash) or pretrained IDs, recency weighting tried on pseudo-time, the base run
    trained twice, and an alternative that would choose again; train.choose_regularised's
    alternative (config.REGULARISED) offered on data with pin fields, withheld on ids-only data,
    tried when it is the run's own setting, or not combined with the recency choice."""
    from ebr.features.state import build_feature_state

    sizes = {**build_feature_state(tiny_ws).sizes, "interest_features": True}
    bare = {**sizes, "pin_cat": [], "n_pin_num": 0, "emb_dim": 0, "interest_features": False}

    def names(over: dict, sz: dict = sizes, timed: bool = True) -> list[str]:
        return [n for n, _ in _alternatives(RunConfig.load(None, {**CFG, **over}), sz, timed)]

    alts = _alternatives(RunConfig.load(None, {**CFG, "train.choose_recency_days": [7, 7, 30]}), sizes, True)
    assert [n for n, _ in alts] == ["recency_7d", "recency_30d", "no_pin_id", "no_pin_id_recency_7d",
                                    "no_pin_id_recency_30d"]
    half_life = {"recency_7d": 7, "recency_30d": 30, "no_pin_id": None, "no_pin_id_recency_7d": 7,
                 "no_pin_id_recency_30d": 30}
    for n, a in alts:
        assert a.model.use_pin_id == ("no_pin_id" not in n)
        assert a.train.recency_half_life_days == half_life[n]
        assert not a.train.choose_pin_id and not a.train.choose_recency_days
    assert names({}) == ["no_pin_id"]
    assert names({}, bare) == ["regularised"]  # ids-only pins: the regularised alternative (default on)
    assert names({"train.choose_regularised": False}, bare) == []
    assert names({"model.id_embeddings": "frozen"}) == []
    assert names({"train.choose_pin_id": False}) == []
    no_reg = {"train.choose_regularised": False}
    assert names({**no_reg, "train.choose_recency_days": [7]}, bare) == ["recency_7d"]
    assert names({**no_reg, "train.choose_recency_days": [7]}, bare, timed=False) == []
    reg = {"train.choose_regularised": True}  # ids-only pins: the regularised alternative, when asked
    assert names(reg) == ["no_pin_id"]
    assert names(reg, bare) == ["regularised"]
    assert names({**reg, "train.mixed_negatives": 1024, "model.dropout": 0.2}, bare) == []  # the run's own
    assert names({**reg, "train.choose_pin_id": False}, bare) == ["regularised"]
    assert names({**reg, "train.choose_recency_days": [7]}, bare) == ["regularised", "recency_7d",
                                                                      "recency_7d_regularised"]
    (_, alt), = _alternatives(RunConfig.load(None, {**CFG, **reg}), bare, False)
    assert (alt.train.mixed_negatives, alt.model.dropout, alt.model.use_pin_id) == (1024, 0.2, True)
    assert not alt.train.choose_regularised
    assert names({"train.choose_pin_id": False, "train.recency_half_life_days": 7,
                  "train.choose_recency_days": [7, 14]}) == ["recency_14d"]
    own = _alternatives(RunConfig.load(None, {"train.recency_half_life_days": 7, "train.choose_recency_days": [30],
                                              "train.choose_pin_id": True}), sizes, True)
    assert [n for n, _ in own] == ["recency_30d", "no_pin_id", "no_pin_id_recency_30d"]
    assert own[1][1].train.recency_half_life_days == 7  # the run's own half-life kept


def test_the_chosen_alternative_is_the_standalone_run_of_its_settings(tiny_ws, single_thread):
    """With both choices (4 selections), every alternative's selected weights and validation recall
    equal a standalone run of its settings, and the winner's refit equals that run's refit (on the
    tiny world the model without IDs wins: neither the base nor the last alternative). Catches the
    recency alternative trained on unweighted examples (or the base on weighted ones), a refit
    that starts from the RNG of the last alternative rather than the winner's, and a refit of the
    wrong settings."""
    base = {**CFG, "train.choose_recency_days": [3.0]}
    s = train(tiny_ws, RunConfig.load(None, base), run="grid", progress=False)
    c = s["choice"]
    assert list(c["val_recall@100"]) == ["base", "recency_3d", "no_pin_id", "no_pin_id_recency_3d"]
    assert c["chosen"] != "base" and c["chosen"] != "no_pin_id_recency_3d"  # the RNG restore is exercised
    plain = {**base, **NO_CHOICE}
    for name, over in (("recency_3d", {"train.recency_half_life_days": 3.0}),
                       ("no_pin_id", {"model.use_pin_id": False}),
                       ("no_pin_id_recency_3d", {"model.use_pin_id": False, "train.recency_half_life_days": 3.0})):
        alone = train(tiny_ws, RunConfig.load(None, {**plain, **over}), run=f"alone-{name}", progress=False)
        assert c["val_recall@100"][name] == pytest.approx(alone["best_val_recall@100"], abs=1e-9), name
        won = name == c["chosen"]
        grid = tiny_ws.run_dir("grid") / ("" if won else f"alternatives/{name}") / "checkpoints"
        for ck in ("best.pt", "refit.pt") if won else ("best.pt",):
            x = torch.load(tiny_ws.run_dir(f"alone-{name}") / "checkpoints" / ck, weights_only=True)["model"]
            y = torch.load(grid / ck, weights_only=True)["model"]
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (name, ck)
        if won:
            assert c["settings"] == over
    assert RunConfig.load(tiny_ws.run_dir("grid") / "config.yaml").model_dump() == \
        RunConfig.load(None, {**plain, **c["settings"]}).model_dump()


@pytest.mark.parametrize("phase,step", [("select-no_pin_id", 12), ("refit", 3)])
def test_a_run_killed_after_the_first_selection_resumes_to_the_same_choice(tiny_ws, monkeypatch, single_thread,
                                                                            phase, step):
    """A failure injected in the second selection (phase select-no_pin_id) or in the refit after
    the model without pin IDs was promoted, then --resume: the choice, the selected checkpoint and
    the refit of the uninterrupted run (on the tiny world the model without IDs wins). Catches a
    resume that promotes again (the alternative's best.pt is gone by then: a crash) and one that
    loses or reverses the first run's choice."""
    cfg = RunConfig.load(None, {**CFG, "train.checkpoint_every": 5})
    a = train(tiny_ws, cfg, run="straight-choice", progress=False)
    assert a["choice"]["chosen"] == "no_pin_id"
    run = f"crashed-{phase}"
    crash_at(tiny_ws, cfg, run, step, monkeypatch, phase=phase)
    b = train(tiny_ws, cfg, run=run, resume=True, progress=False)
    assert a["choice"] == b["choice"]
    for ck in ("best.pt", "refit.pt"):
        x = torch.load(tiny_ws.run_dir("straight-choice") / "checkpoints" / ck, weights_only=True)["model"]
        y = torch.load(tiny_ws.run_dir(run) / "checkpoints" / ck, weights_only=True)["model"]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (ck, k)


def test_no_choose_flag_trains_the_config_as_given():
    """`ebr train --no-choose` switches both choices off, and without it the defaults choose.
    Catches the flag ignored, or clearing only one of the two settings."""
    from ebr.cli import _overrides, build_parser

    off = RunConfig.load(None, _overrides(build_parser().parse_args(["train", "--no-choose"]))).train
    on = RunConfig.load(None, _overrides(build_parser().parse_args(["train"]))).train
    assert (off.choose_pin_id, off.choose_recency_days) == (False, [])
    assert on.choose_pin_id and on.choose_recency_days == [7.0]


def test_paired_gain_is_the_mean_difference_and_its_standard_error():
    """By hand: per-user differences [1, 0, 0, 0]: mean 0.25, sample std 0.5 (ddof 1), standard
    error 0.5 / sqrt(4) = 0.25. Mutations caught: ddof 0 (0.2165), the std itself as the error (no
    sqrt(n)), base minus alternative (a negative gain)."""
    from ebr.train.loop import beats, paired_gain

    g = paired_gain(np.array([1.0, 0.5, 0.2, 0.0]), np.array([0.0, 0.5, 0.2, 0.0]), 4)
    assert g["diff"] == pytest.approx(0.25) and g["se"] == pytest.approx(0.25)
    assert beats(g, 0.99) and not beats(g, 1.0) and beats(g, 0.0)


def test_choice_rule_without_an_error_or_without_validation_users():
    """One validation user: no standard error, so only margin 0 (the best recall) can choose; no
    validation user: no gain and no choice, and no crash (the record is missing because nothing was
    measured, not because a checkpoint predates it). A run resumed from a checkpoint without the
    per-user record is refused. Mutations caught: se = inf with 0 * inf = nan comparisons (margin 0
    never choosing), the empty case raising."""
    from ebr.errors import EbrError
    from ebr.train.loop import beats, paired_gain

    one = paired_gain(np.array([1.0]), np.array([0.0]), 1)
    assert one == {"diff": 1.0, "se": None} and beats(one, 0.0) and not beats(one, 1.0)
    none = paired_gain(None, None, 0)
    assert none == {"diff": None, "se": None} and not beats(none, 0.0)
    with pytest.raises(EbrError, match="without --resume"):
        paired_gain(np.array([0.5, 0.5]), None, 2)


def test_choose_margin_keeps_the_run_unless_the_alternative_wins_by_the_margin(tiny_ws, single_thread):
    """At the default lr the tiny world's validation favours the model without pin IDs (margin 0).
    Its recorded gain is the difference of the two validation recalls (the per-user records are the
    users the mean was taken over), and a margin set just below its gain / error keeps it, just above
    keeps the run's own settings, whose selected checkpoint and refit are then the plain run's.
    Mutations caught: the margin ignored, the alternative compared with a margin in recall units
    rather than standard errors, the per-user records of another step than the selected one."""
    s = train(tiny_ws, RunConfig.load(None, CFG), run="margin-0", progress=False)
    c = s["choice"]
    assert c["chosen"] == "no_pin_id" and c["margin"] == 0.0
    g = c["paired"]["no_pin_id"]
    assert g["diff"] == pytest.approx(c["val_recall@100"]["no_pin_id"] - c["val_recall@100"]["base"], abs=1e-12)
    z = g["diff"] / g["se"]
    assert 0.05 < z < 20  # room for margins each side
    below = train(tiny_ws, RunConfig.load(None, {**CFG, "train.choose_margin": 0.9 * z}), run="margin-below",
                  progress=False)
    above = train(tiny_ws, RunConfig.load(None, {**CFG, "train.choose_margin": 1.1 * z}), run="margin-above",
                  progress=False)
    assert below["choice"]["chosen"] == "no_pin_id" and above["choice"]["chosen"] == "base"
    assert above["choice"]["paired"] == c["paired"] and above["best_val_recall@100"] == c["val_recall@100"]["base"]
    train(tiny_ws, RunConfig.load(None, {**CFG, **NO_CHOICE}), run="margin-plain", progress=False)
    for ck in ("best.pt", "refit.pt"):
        x = torch.load(tiny_ws.run_dir("margin-plain") / "checkpoints" / ck, weights_only=True)["model"]
        y = torch.load(tiny_ws.run_dir("margin-above") / "checkpoints" / ck, weights_only=True)["model"]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), ck
