"""The towers' training pass against the plain computation it speeds up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebr.config import ModelConfig
from ebr.features.state import build_feature_state
from ebr.model.ops import lookup
from ebr.model.towers import TwoTower


@pytest.mark.parametrize("extras", [{}, {"pin_bias": True}])
def test_training_pass_projects_each_distinct_item_once_with_the_same_result(tiny_ws, extras):
    """embed_users_and_pins projects the history on the distinct items and gathers the projection
    (B*L rows -> a few hundred); the result and every gradient equal the plain order (gather the
    item representations per history slot, then the user tower). Catches a projection applied
    twice or without its bias, the wrong slice of the inverse index (history vs the pins' part),
    or an action embedding dropped on the fast path, and (second case) the history positions
    added on the plain path only; `distinct` given ahead changes nothing."""
    fs = build_feature_state(tiny_ws)
    torch.manual_seed(0)
    B, L, n_pins = 6, 12, fs.sizes["n_pins"]
    sizes = {**fs.sizes, "interest_features": True, "time_fields": [30, 32], "history_positions": L if extras else 0}
    model = TwoTower(sizes, ModelConfig(**extras)).eval()
    if extras:  # non-zero positions and bias head, so that dropping either changes the result
        with torch.no_grad():
            model.user.history.position.normal_()
            model.pin.bias.weight.normal_()
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(0, n_pins, (B, L), generator=g)
    rest = (torch.randint(1, 6, (B, L), generator=g), torch.randint(0, 2, (B, len(fs.user_cat)), generator=g),
            torch.randint(0, len(fs.interests), (B, 3), generator=g), torch.zeros(B, dtype=torch.long),
            torch.arange(B))
    pins = torch.randint(2, n_pins, (B,), generator=g)
    cat, num = torch.randint(0, 2, (n_pins, len(fs.sizes["pin_cat"]))), torch.randn(n_pins, fs.sizes["n_pin_num"])
    emb, interests = torch.randn(n_pins, fs.sizes["emb_dim"]), torch.randint(0, len(fs.interests), (n_pins, 2))

    def fields(ids):
        return ids, cat[ids], num[ids], emb[ids], interests[ids]

    def grads(u, v):
        model.zero_grad()
        (u.pow(3).sum() + (v * torch.arange(v.shape[1])).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    u, v = model.embed_users_and_pins(hist, rest, pins, fields)
    fast = grads(u, v)
    # the distinct codes computed ahead (as training's batch assembly does) give the same pass
    uniq, inv = np.unique(torch.cat([hist.reshape(-1), pins]).numpy(), return_inverse=True)
    distinct = (torch.from_numpy(uniq), torch.from_numpy(inv))
    ahead = model.embed_users_and_pins(hist, rest, pins, fields, distinct=distinct)
    assert torch.equal(ahead[0], u) and torch.equal(ahead[1], v)
    ref_u = model.user(model.items(*fields(hist.reshape(-1))).view(B, L, -1), *rest)
    ref_v = model.pin(model.items(*fields(pins)))
    ref = grads(ref_u, ref_v)
    assert torch.allclose(u, ref_u, atol=1e-5) and torch.allclose(v, ref_v, atol=1e-5)
    assert fast.keys() == ref.keys() and "user.history.proj.weight" in fast
    for n in ref:
        assert torch.allclose(fast[n], ref[n], atol=1e-4, rtol=1e-4), n


def test_pin_id_dropout_reaches_the_learned_ids_in_training_only(tiny_ws):
    """model.pin_id_dropout p: in training, elements of the learned pin-ID embedding are zeroed
    (share about p) and the rest scaled by 1/(1-p); in eval the embedding passes whole; the other
    fields are untouched. Catches the setting not reaching the ItemEncoder (only pretrained IDs got
    dropout before) and dropout applied to every field."""
    fs = build_feature_state(tiny_ws)
    cfg = ModelConfig(pin_id_dropout=0.5)
    torch.manual_seed(0)
    model = TwoTower({**fs.sizes, "interest_features": True}, cfg)
    n_pins = fs.sizes["n_pins"]
    ids = torch.arange(2, n_pins)
    cat = torch.zeros(len(ids), len(fs.sizes["pin_cat"]), dtype=torch.long)
    num, emb = torch.randn(len(ids), fs.sizes["n_pin_num"]), torch.randn(len(ids), fs.sizes["emb_dim"])
    interests = torch.zeros(len(ids), 2, dtype=torch.long)
    own = model.items.id.weight[ids].detach()
    model.eval()
    plain = model.items(ids, cat, num, emb, interests).detach()
    model.train()
    dropped = model.items(ids, cat, num, emb, interests).detach()
    d = cfg.id_dim
    assert torch.equal(plain[:, :d], own)
    zero = dropped[:, :d] == 0
    assert 0.45 < zero.float().mean() < 0.55
    assert torch.allclose(dropped[:, :d][~zero], 2 * own[~zero])
    assert torch.equal(dropped[:, d:], plain[:, d:])


def test_lookup_equals_the_embedding_and_its_gradient():
    """lookup (index_select, for its faster backward) gives nn.Embedding's rows and the same
    gradient for any shape of codes, repeated codes included. Catches the wrong trailing shape
    (rows and columns of a (B, L) code grid swapped) and a backward that drops repeated codes."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(7, 4)
    codes = torch.tensor([[1, 3, 3], [0, 6, 1]])
    g = torch.randn(2, 3, 4)
    got = lookup(table, codes)
    (got * g).sum().backward()
    grad = table.weight.grad.clone()
    table.zero_grad()
    want = table(codes)
    (want * g).sum().backward()
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.allclose(grad, table.weight.grad, atol=1e-6)


def test_history_pooling_is_the_masked_mean_and_the_attention_pooling():
    """HistoryEncoder pools with one batched matmul; its two halves equal the definitions: the mean
    of the valid items (hides and padding excluded) and the softmax-attention pooling over them,
    zeros for a row with none. Catches the halves swapped, the mean over every slot, and a row
    without valid items turned to NaN (a division by its zero count)."""
    from ebr.model.interests import valid_items
    from ebr.model.towers import HistoryEncoder

    torch.manual_seed(0)
    enc = HistoryEncoder(10, 6)
    hist = torch.randn(3, 5, 10)
    actions = torch.tensor([[1, 2, 0, 0, 0], [3, 1, 2, 1, 1], [0, 0, 0, 0, 0]])
    actions[1, 2] = 5  # a hide: stays in the sequence, out of the pooling
    assert not valid_items(actions)[1, 2] and valid_items(actions)[1, 1]
    out = enc(hist, actions)
    h = torch.nn.functional.gelu(enc.proj(hist) + enc.action(actions))
    for b in range(3):
        keep = valid_items(actions)[b]
        if not keep.any():
            assert torch.equal(out[b], torch.zeros(12))
            continue
        hb = h[b][keep]
        w = torch.softmax(hb @ enc.query, 0)
        assert torch.allclose(out[b, :6], hb.mean(0), atol=1e-6)
        assert torch.allclose(out[b, 6:], (w[:, None] * hb).sum(0), atol=1e-6)


def test_history_positions_count_back_from_the_most_recent_slot():
    """model.history_position: slot j of a left-padded history (slot -1 the most recent event)
    gets the position table's row for its distance from the end, so a history shorter than the
    table reads the table's last rows; the positions enter before the GELU and both poolings.
    Catches the table read from its first rows or reversed, the positions left out, and a history
    longer than the table let through (a one-row slice would add the same row to every slot)."""
    from ebr.model.interests import valid_items
    from ebr.model.towers import HistoryEncoder

    torch.manual_seed(0)
    enc = HistoryEncoder(10, 6, positions=8)
    with torch.no_grad():
        enc.position.normal_()
    hist = torch.randn(2, 5, 10)
    actions = torch.tensor([[0, 0, 1, 2, 1], [3, 1, 2, 1, 1]])
    out = enc(hist, actions)
    h = torch.nn.functional.gelu(enc.proj(hist) + enc.action(actions) + enc.position[3:8])
    for b in range(2):
        keep = valid_items(actions)[b]
        hb = h[b][keep]
        w = torch.softmax(hb @ enc.query, 0)
        assert torch.allclose(out[b, :6], hb.mean(0), atol=1e-6)
        assert torch.allclose(out[b, 6:], (w[:, None] * hb).sum(0), atol=1e-6)
    with pytest.raises(ValueError, match="longer than the 8 positions"):
        enc(torch.randn(1, 9, 10), torch.ones(1, 9, dtype=torch.long))


def test_pin_bias_adds_b_to_every_score_and_keeps_the_time_term(tiny_ws):
    """model.pin_bias: score(u, i, t) = (<u, v_i> + <w_u, c_i(t)>) / tau + b_i, b_i the bias
    head on the pin tower's crossing output, as one inner product of the query [u, 1, w] with the
    index vector [v, tau b, c]; the training pass's time term reads the same w. Catches the bias
    left unscaled by tau, the query's constant column at 0 (no bias), and the time term reading
    its weights from the wrong column, and a bias head that does not start at zero (a new model's
    scores are the model's without the bias)."""
    fs = build_feature_state(tiny_ws)
    torch.manual_seed(0)
    cfg = ModelConfig(pin_bias=True)
    model = TwoTower({**fs.sizes, "interest_features": True, "time_fields": [30, 32]}, cfg).eval()
    with torch.no_grad():
        assert torch.equal(model.pin(torch.randn(5, model.items.out_dim))[:, cfg.dim], torch.zeros(5))
        model.pin.bias.weight.normal_()
        model.pin.bias.bias.fill_(0.3)
        for e in model.time:
            e.weight.normal_()
    B, L, n_pins, d = 4, 6, fs.sizes["n_pins"], cfg.dim
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(0, n_pins, (B, L), generator=g)
    rest = (torch.randint(1, 6, (B, L), generator=g), torch.randint(0, 2, (B, len(fs.user_cat)), generator=g),
            torch.randint(0, len(fs.interests), (B, 3), generator=g), torch.zeros(B, dtype=torch.long),
            torch.arange(B))
    pins = torch.arange(2, 9)
    cat, num = torch.randint(0, 2, (n_pins, len(fs.sizes["pin_cat"]))), torch.randn(n_pins, fs.sizes["n_pin_num"])
    emb, interests = torch.randn(n_pins, fs.sizes["emb_dim"]), torch.randint(0, len(fs.interests), (n_pins, 2))

    def fields(ids):
        return ids, cat[ids], num[ids], emb[ids], interests[ids]

    with torch.no_grad():
        q, v = model.embed_users_and_pins(hist, rest, pins, fields)
        h = model.pin.crossing(model.items(*fields(pins)))
        b = model.pin.bias(h)[:, 0]
        unit_v = torch.nn.functional.normalize(h, dim=-1)
        u, w = q[:, :d], q[:, d + 1:]
        buckets = torch.randint(0, 30, (len(pins), 2), generator=g)
        c = sum(e(buckets[:, f]) for f, e in enumerate(model.time))
        want = (u @ unit_v.T + w @ c.T) / cfg.temperature + b[None, :]
        got = q @ model.index_vectors(v, buckets).T / cfg.temperature
        assert b.abs().min() > 0.01 and torch.allclose(u.norm(dim=1), torch.ones(B), atol=1e-5)
        assert torch.allclose(got, want, atol=1e-4)
        # training's time term: every pin read as of each row's time (here the same buckets per row)
        tl = model.time_logits(q, buckets[None].expand(B, -1, -1))
        assert torch.allclose(tl, w @ c.T, atol=1e-5)
