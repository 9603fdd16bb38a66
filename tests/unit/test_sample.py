"""Pure-function tests of orchestrator.sample."""

import torch

from orchestrator.sample import make_rng, nucleus_mask, sample_token

IDS = torch.tensor([7, 3, 9, 5])
LPS = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1]))


def test_temperature_zero_is_greedy():
    assert sample_token(IDS, LPS, 0.0, 1.0, make_rng(0)) == 3


def test_greedy_ties_break_toward_smaller_id():
    lps = torch.log(torch.tensor([0.4, 0.1, 0.4, 0.1]))
    assert sample_token(IDS, lps, 0.0, 1.0, make_rng(0)) == 7
    assert sample_token(torch.tensor([9, 2]), torch.tensor([-1.0, -1.0]), 0.0, 1.0, make_rng(0)) == 2


def test_seed_reproducibility():
    a = [sample_token(IDS, LPS, 1.0, 1.0, r) for r in [make_rng(42)] for _ in range(50)]
    b = [sample_token(IDS, LPS, 1.0, 1.0, r) for r in [make_rng(42)] for _ in range(50)]
    c = [sample_token(IDS, LPS, 1.0, 1.0, r) for r in [make_rng(43)] for _ in range(50)]
    assert a == b and a != c


def test_frequencies_follow_the_distribution():
    rng = make_rng(0)
    draws = [sample_token(IDS, LPS, 1.0, 1.0, rng) for _ in range(4000)]
    share = draws.count(3) / len(draws)
    assert 0.46 < share < 0.54


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert nucleus_mask(probs, 0.5).tolist() == [False, True, False, False]
    assert nucleus_mask(probs, 0.6).tolist() == [False, True, True, False]
    rng = make_rng(1)
    assert {sample_token(IDS, LPS, 1.0, 0.5, rng) for _ in range(100)} == {3}


def test_excluded_candidates_are_never_sampled():
    lps = torch.tensor([float("-inf"), -0.1, float("-inf"), -3.0])
    rng = make_rng(0)
    assert {sample_token(IDS, lps, 2.0, 1.0, rng) for _ in range(300)} <= {3, 5}
