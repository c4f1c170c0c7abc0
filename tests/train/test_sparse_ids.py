"""The pin-ID table's sparse gradient, made dense in a kept buffer, trains what the dense backward
trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebr.config import RunConfig
from ebr.train.loop import TrainState, assemble, epoch_order, prepare, train_step
from ebr.train.loss import inclusion_log_prob


@pytest.mark.parametrize("weight_decay, fused", [(0.0, True), (0.01, False)])
def test_sparse_id_gradient_trains_what_the_dense_one_trains(tiny_ws, weight_decay, fused):
    """Six steps with the sparse pin-ID gradient (dense_id_grad's buffer, only last step's rows
    zeroed) end with the weights of six steps of the dense backward, with fused Adam and with the
    per-tensor one under weight decay (Adam reading the buffer must not leave anything in it).
    Catches last step's rows left in the buffer (gradients accumulating across steps), the
    buffer's rows zeroed after the add, duplicate rows of a batch counted once, and the sparse
    gradient reaching Adam undensified (an error)."""
    cfg = RunConfig.load(None, {"train.batch_size": 128, "train.weight_decay": weight_decay,
                                "train.fused_adam": fused, "model.hidden": [32],
                                "model.pin_id_min_count": 3})  # rare pins share one row: duplicate rows
    d = prepare(tiny_ws, cfg)
    B = cfg.train.batch_size
    log_q = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), B)
    perm = epoch_order(d.examples, B, cfg.train.seed, 0, cfg.train.time_local_batches)
    weights = []
    for sparse in (True, False):
        torch.manual_seed(0)
        s = TrainState.fresh(cfg, d.sizes, positives=d.positives())
        s.model.items.sparse_id_grad = sparse
        s.model.train()
        for i in range(6):
            idx = perm[i * B: (i + 1) * B]
            s.step += 1
            train_step(s, d, cfg, idx, log_q, None, assemble(d, cfg, idx, s.step, s.ranks))
        assert (s.id_grad is not None) == sparse
        weights.append({k: v.clone() for k, v in s.model.state_dict().items()})
    torch.manual_seed(0)
    init = TrainState.fresh(cfg, d.sizes, positives=d.positives()).model.items.id.weight
    assert (weights[0]["items.id.weight"] != init).any(1).sum() > 100  # the ID rows of the batches moved
    for k in weights[1]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k
