"""Adaptive k: one expert when the gate is sure, up to three when it is not (gating.adaptive)."""

import torch

from gating.adaptive import adaptive_k, experts_for, selection_mask
from gating.mix import gate_weights


def logits_for(probs):
    return torch.log(torch.tensor(probs))


def test_k_is_the_smallest_top_k_reaching_the_threshold():
    rows = logits_for([[0.95, 0.03, 0.01, 0.01],     # sure: 1
                       [0.6, 0.35, 0.03, 0.02],      # two carry 0.95: 2
                       [0.4, 0.3, 0.2, 0.1],         # unsure: 3 (clamped, 4 would be needed)
                       [0.25, 0.25, 0.25, 0.25]])
    assert adaptive_k(rows, 0.9).tolist() == [1, 2, 3, 3]
    assert adaptive_k(rows, 0.5).tolist() == [1, 1, 2, 2]
    assert adaptive_k(rows, 0.97, k_min=2).tolist() == [2, 3, 3, 3]


def test_selection_and_weights_follow_mixtral_rule_for_each_k():
    rows = logits_for([[0.1, 0.6, 0.25, 0.05], [0.97, 0.01, 0.01, 0.01]])
    ks = adaptive_k(rows, 0.8)
    assert ks.tolist() == [2, 1]
    assert selection_mask(rows, ks).tolist() == [[False, True, True, False], [True, False, False, False]]
    (e0, w0), (e1, w1) = experts_for(rows, 0.8)
    experts, weights = gate_weights(rows[:1], 2)
    assert e0 == experts[0].tolist() and torch.allclose(torch.tensor(w0), weights[0])
    assert e1 == [0] and w1 == [1.0]


def test_k_never_exceeds_the_number_of_experts():
    assert adaptive_k(torch.zeros(3, 2), 0.99).tolist() == [2, 2, 2]
