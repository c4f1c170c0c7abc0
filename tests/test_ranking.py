"""Metrics on small cases checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebr.ranking import metrics_at_k, topk_masked


def test_metrics_hand_checked():
    top = np.array([[5, 3, 9, 1], [2, 4, 6, 8]])
    targets = [np.array([3, 1, 7]), np.array([10])]
    interests = [[] for _ in range(11)]
    interests[3], interests[1], interests[7], interests[5], interests[10] = [0], [1], [2], [0], [3]
    m = metrics_at_k(top, targets, [2, 4], interests)
    # user 0: hits at ranks 2 and 4; user 1: none
    assert m["recall@2"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["recall@4"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["hr@2"] == 0.5 and m["hr@4"] == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@4"] == pytest.approx((dcg / idcg + 0) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) / (1 + 1 / math.log2(3))) / 2)
    # coverage: user 0's target interests {0,1,2}; top-2 holds interests {0}, top-4 {0, 1}
    assert m["coverage@2"] == pytest.approx((1 / 3 + 0) / 2) and m["coverage@4"] == pytest.approx((2 / 3 + 0) / 2)


def test_topk_masked_excludes_and_restricts():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    v, i = topk_masked(scores, 2, [np.array([0]), np.array([3, 2])], allowed=torch.tensor([True, True, True, False]))
    assert i.tolist() == [[1, 2], [1, 0]]
