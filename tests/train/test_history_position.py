"""model.history_position: each history slot's position embedded where the split asks for each user's
next engagement with point-in-time histories, resolved from the data, carried by the checkpoint's
sizes, refused on a mismatched resume."""

from __future__ import annotations

import pytest
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.errors import EbrError
from ebr.train.loop import prepare, train
from tests.conftest import crash_at

CFG = {"train.epochs": 1, "train.batch_size": 256, "train.threads": 1, "train.val_users": 50,
       "model.hidden": [32], **NO_CHOICE}
LLO = {**CFG, "data.split": "leave_last_out"}


def test_auto_embeds_positions_for_next_engagement_with_point_in_time_histories(llo_ws, tiny_ws, tmp_path):
    """auto: positions (features.history_len of them) under a leave-last-out split with
    point-in-time histories, and under a given split whose lines are in engagement order (its
    validation each user's last rows, its histories point in time); none under a temporal split,
    nor where histories are read at the end of the data (forced `end`, or data without time whose
    lines are in id order or whose validation is forced random); `on` and `off` force either.
    Catches the rule inverted, `auto` read as on (or off) everywhere, the split's kind ignored,
    engagement-ordered lines read as unordered, and the sizes the model is built from left
    without the count."""
    from tests.data.test_given_split import _adjacency

    def positions(ws, base=LLO, **over):
        return prepare(ws, RunConfig.load(None, {**base, **over})).sizes["history_positions"]

    assert positions(llo_ws) == 50
    assert positions(llo_ws, **{"features.history_len": 20}) == 20
    assert positions(llo_ws, **{"features.history_as_of": "end"}) == 0
    assert positions(llo_ws, **{"model.history_position": "off"}) == 0
    assert positions(tiny_ws, CFG) == 0  # temporal
    assert positions(tiny_ws, CFG, **{"model.history_position": "on"}) == 50
    untimed = _adjacency(tmp_path / "ids", order="id")
    assert positions(untimed, CFG) == 0
    assert positions(untimed, CFG, **{"model.history_position": "on"}) == 50
    ordered = _adjacency(tmp_path / "seq", order="engagement")
    assert positions(ordered, CFG) == 50
    assert positions(ordered, CFG, **{"data.given_validation": "random"}) == 0


def test_positions_are_trained_saved_and_rebuilt_from_the_checkpoint(llo_ws):
    """A default run on a leave-last-out split trains a (history_len, field_dim) position table (it moves from
    its zero start), records the resolved choice, and the selected and refit checkpoints rebuild it
    from their own sizes (the bundle's loader). Catches the table never reaching the optimiser
    and the count missing from the checkpoint's sizes (the bundle would serve without it)."""
    from ebr.index.bundle import load_checkpoint

    cfg = RunConfig.load(None, {**LLO, "train.max_steps": 4})
    summary = train(llo_ws, cfg, run="positions", progress=False)
    assert summary["history_positions"] is True
    for name in ("best.pt", "refit.pt"):
        model, ck = load_checkpoint(llo_ws.run_dir("positions") / "checkpoints" / name)
        pos = model.user.history.position
        assert pos is not None and pos.shape == (50, cfg.model.field_dim), name
        assert torch.equal(pos, ck["model"]["user.history.position"]) and pos.abs().sum() > 0, name


def test_resuming_a_checkpoint_from_before_positions_is_a_clear_error(llo_ws, monkeypatch):
    """A checkpoint saved before model.history_position (no count in its sizes, no key in its
    config) resumes under `auto`, which now embeds positions on this data: an EbrError that says
    to start again, not load_state_dict's missing-key traceback; so does a checkpoint with
    positions where the run resolves none. Catches the check removed, or made one-way."""
    cfg = RunConfig.load(None, {**LLO, "train.checkpoint_every": 2, "model.history_position": "off"})
    path = crash_at(llo_ws, cfg, "old-ck", 3, monkeypatch)
    state = torch.load(path, weights_only=True)
    del state["config"]["model"]["history_position"]
    del state["sizes"]["history_positions"]
    torch.save(state, path)
    with pytest.raises(EbrError, match="history positions"):
        train(llo_ws, cfg, run="old-ck", resume=True, progress=False)
    # the other way: positions in the checkpoint, none in the run its config now resolves
    state["config"]["model"]["history_position"] = "off"
    state["sizes"]["history_positions"] = 50
    state["model"]["user.history.position"] = torch.zeros(50, 32)
    torch.save(state, path)
    with pytest.raises(EbrError, match="history positions"):
        train(llo_ws, cfg, run="old-ck", resume=True, progress=False)


def test_a_pin_bias_run_trains_the_bias_and_its_bundle_serves_it(tiny_ws):
    """model.pin_bias through `train()` and `build_bundle`: the bias head moves from its zero start,
    and the bundle's index vectors carry tau * b_i in the column after the unit-norm embedding.
    A temporal split records no history positions. Catches the training step slicing the query
    to model.dim (every pin-bias run fails), a bias head left out of the optimiser, and a summary
    that records positions it did not embed."""
    import numpy as np

    from ebr.index.bundle import build_bundle, load_checkpoint

    cfg = RunConfig.load(None, {**CFG, "train.max_steps": 4, "model.pin_bias": True})
    summary = train(tiny_ws, cfg, run="pin-bias", progress=False)
    assert summary["history_positions"] is False
    model, _ = load_checkpoint(tiny_ws.run_dir("pin-bias") / "checkpoints" / "refit.pt")
    assert model.pin.bias.weight.abs().sum() > 0
    emb = np.load(build_bundle(tiny_ws, "pin-bias", "temporal") / "pin_embeddings.npy")
    d = cfg.model.dim
    assert np.allclose(np.linalg.norm(emb[2:, :d], axis=1), 1, atol=1e-4)
    assert np.abs(emb[2:, d]).max() > 0 and emb.shape[1] == d + 1 + cfg.model.time_dim
