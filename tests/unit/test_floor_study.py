"""The pure mixing references of gating/floor_study.py (the offline quality study)."""

from __future__ import annotations

import math

import torch

from gating.floor_study import exact_mix, fixed_share


def test_fixed_share_of_identical_experts_is_each_of_them():
    lp = torch.log(torch.tensor([0.5, 0.1, 0.25]))[:, None].expand(-1, 3)
    assert torch.allclose(fixed_share(lp, 0.1), lp[:, 0], atol=1e-6)


def test_fixed_share_starts_uniform_and_moves_towards_the_expert_that_predicts_the_tokens():
    good, bad = math.log(0.9), math.log(0.01)
    lp = torch.tensor([[good, bad]] * 20)
    out = fixed_share(lp, 0.05).exp()
    assert abs(float(out[0]) - (0.9 + 0.01) / 2) < 1e-6                 # uniform at the first token
    assert float(out[-1]) > 0.85                                         # then mostly the good expert
    assert float(out[-1]) <= 0.9 * (1 - 0.05 / 2) + 0.01 * 0.05 / 2 + 1e-6   # the leak keeps the other alive


def test_fixed_share_without_switching_is_the_bayesian_mixture_of_whole_sequences():
    lp = torch.log(torch.rand(7, 3).clamp_min(1e-3))
    got = fixed_share(lp, 0.0).sum()
    want = torch.logsumexp(lp.sum(0), 0) - math.log(3)                    # p(seq) = mean over experts
    assert torch.allclose(got, want, atol=1e-5)


def test_exact_mix_in_probability_space_is_the_weighted_sum_of_distributions():
    lp = torch.log_softmax(torch.randn(4, 2, 11), -1)
    w = torch.tensor([[0.7, 0.3]] * 4)
    got = exact_mix(lp, w, "probs").exp()
    assert torch.allclose(got, 0.7 * lp[:, 0].exp() + 0.3 * lp[:, 1].exp(), atol=1e-6)
    assert torch.allclose(exact_mix(lp, w, "logits").exp().sum(-1), torch.ones(4), atol=1e-5)
