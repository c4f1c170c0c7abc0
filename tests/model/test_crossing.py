"""Crossing blocks: shapes, gradients, hand-checked mask, field order, export, serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebr.config import NO_CHOICE, ModelConfig, RunConfig
from ebr.model.crossing import DHEN, FieldTransformer, MaskBlock, OriginalMaskBlock, ParallelMaskNet, make_crossing

WIDTHS = [16, 8, 8, 32]


@pytest.mark.parametrize("kind", ["mlp", "masknet", "dhen"])
def test_shapes_and_every_parameter_gets_a_gradient(kind):
    torch.manual_seed(0)
    block = make_crossing(kind, WIDTHS, 24, ModelConfig(hidden=[64]))
    x = torch.randn(5, sum(WIDTHS))
    y = block(x)
    assert y.shape == (5, 24)
    y.pow(2).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


@pytest.mark.parametrize("kind", ["mlp", "masknet", "dhen"])
def test_input_norm_setting_reaches_every_block(kind):
    """model.input_norm: `field` is blind to one field's scale, `global` only to the whole input's,
    `none` to neither. Catches a block that ignores the setting (always per-field: the global and
    none cases fail) or a norm applied over the wrong span."""
    torch.manual_seed(0)
    x = torch.randn(4, sum(WIDTHS))
    one_field = x.clone()
    one_field[:, 16:24] *= 50.0  # the second field only
    outs = {}
    for norm in ("field", "global", "none"):
        torch.manual_seed(1)
        block = make_crossing(kind, WIDTHS, 24, ModelConfig(hidden=[64], input_norm=norm)).eval()
        with torch.no_grad():
            outs[norm] = [block(v) for v in (x, one_field, 3.0 * x)]
    same = lambda a, b: torch.allclose(a, b, atol=1e-4)  # noqa: E731
    assert same(outs["field"][0], outs["field"][1]) and same(outs["field"][0], outs["field"][2])
    assert not same(outs["global"][0], outs["global"][1]) and same(outs["global"][0], outs["global"][2])
    assert not same(outs["none"][0], outs["none"][1]) and not same(outs["none"][0], outs["none"][2])
    with pytest.raises(ValueError, match="input_norm"):
        from ebr.model.crossing import input_norm
        input_norm(WIDTHS, "batch")


def test_original_maskblock_variant():
    cfg = ModelConfig(hidden=[64])
    cfg.masknet.variant = "original"
    block = make_crossing("masknet", WIDTHS, 12, cfg)
    assert any(isinstance(m, OriginalMaskBlock) for m in block.modules())
    assert block(torch.randn(3, sum(WIDTHS))).shape == (3, 12)


def test_mask_really_multiplies():
    """m=2, ratio 0.5, q=1, weights set by hand: x=[1,2]; mask = W2 relu(W1 x) = [1,2]*3 = [3,6];
    h = x*mask = [3,12]; o = W4 relu(W3 h) + b4 = 2*relu(3 + 0.5*12) + 1 = 19.
    Without the mask the same weights give 2*relu(1 + 0.5*2) + 1 = 5."""
    b = MaskBlock(2, q=1, ratio=0.5)
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
        b.mask[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        b.mask[2].weight.copy_(torch.tensor([[1.0], [2.0]]))
        b.out[0].weight.copy_(torch.tensor([[1.0, 0.5]]))
        b.out[2].weight.copy_(torch.tensor([[2.0]]))
        b.out[2].bias.copy_(torch.tensor([1.0]))
    assert b(torch.tensor([[1.0, 2.0]])).item() == pytest.approx(19.0)


def test_parallel_masknet_concatenates_blocks():
    net = ParallelMaskNet(10, 6, blocks=4, q=8, bottleneck=16)
    assert len(net.blocks) == 4 and net.head[0].in_features == 32
    assert net(torch.randn(2, 10)).shape == (2, 6)


def test_field_transformer_is_not_a_bag_of_fields():
    torch.manual_seed(0)
    ft = FieldTransformer([8, 8, 8], 5, token_dim=8, layers=1, heads=2).eval()
    a, b, c = torch.randn(3, 1, 8)
    x = torch.cat([a, b, c], dim=-1)
    swapped = torch.cat([b, a, c], dim=-1)
    assert not torch.allclose(ft(x), ft(swapped), atol=1e-5)


def test_dhen_levels_follow_the_config():
    d = DHEN(WIDTHS, 7, [["mlp", "masknet"], ["mlp", "transformer"]], width=32,
             masknet={"q": 16, "bottleneck": 16}, transformer={"token_dim": 8, "heads": 2, "layers": 1})
    kinds = [[type(m).__name__ for m in level.mods] for level in d.levels]
    assert kinds == [["Sequential", "ParallelMaskNet"], ["Sequential", "FieldTransformer"]]
    assert d(torch.randn(4, sum(WIDTHS))).shape == (4, 7)


def test_dhen_user_tower_exports_and_reloads(tiny_ws, tmp_path):
    from ebr.features.state import build_feature_state
    from ebr.index.bundle import export_user_tower
    from ebr.model.towers import TwoTower

    fs = build_feature_state(tiny_ws)
    cfg = ModelConfig(crossing="dhen", pin_bias=True)
    # with every optional input on: followed interests, the age term's query part, the pin bias's
    # constant column and the history positions
    model = TwoTower({**fs.sizes, "interest_features": True, "time_fields": [30, 32, 32], "history_positions": 20},
                     cfg).eval()
    with torch.no_grad():
        model.user.history.position.normal_()
    path = tmp_path / "tower.pt2"
    export_user_tower(model, 20, len(fs.user_cat), 8, path)
    loaded = torch.export.load(path).module()
    again = torch.export.load(path).module()
    for B in (1, 7):
        args = (
            torch.randn(B, 20, model.items.out_dim),
            torch.randint(0, 6, (B, 20)),
            torch.randint(0, 3, (B, len(fs.user_cat))),
            torch.randint(0, len(fs.interests), (B, 8)),
            torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.long),
        )
        with torch.no_grad():
            out = loaded(*args)
            assert torch.equal(out, again(*args))  # a reloaded export is deterministic, bit for bit
            # and computes what the eager tower computes (kernels may differ in the last bits)
            assert torch.allclose(out, model.user(*args), atol=1e-5)


@pytest.mark.parametrize("kind", ["masknet", "dhen"])
def test_bundles_of_crossing_runs_serve(tiny_ws, kind):
    from ebr.index.bundle import build_bundle
    from ebr.serve.retriever import Retriever
    from ebr.train.loop import train

    cfg = RunConfig.load(
        None,
        {
            "model.crossing": kind,
            "train.epochs": 1,
            "train.batch_size": 256,
            "model.dhen.width": 64,
            "model.masknet.q": 32,
            **NO_CHOICE,
        },
    )
    train(tiny_ws, cfg, run=f"x-{kind}", progress=False)
    r = Retriever(build_bundle(tiny_ws, f"x-{kind}", "latest", backend="hnsw"))
    user = next(u for u in r.fs.users.ids if r.is_warm(int(r.user_codes([u])[0])))
    res = r.retrieve(user, 10)
    assert len(res.pin_ids) == 10 and not res.cold_start
    assert np.all(np.diff(res.scores) <= 1e-6)
