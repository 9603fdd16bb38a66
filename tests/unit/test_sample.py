"""Pure-function tests of orchestrator.sample."""

import math

import pytest
import torch

from gating.mix_row import RowMix, rows_of
from orchestrator.sample import draw_outside, draw_weights, make_rng, nucleus, sample_row

IDS = [7, 3, 9, 5]
LPS = [math.log(p) for p in (0.1, 0.5, 0.3, 0.1)]


def sample_token(ids, lps, temperature: float, top_p: float, rng) -> int:
    """One draw from the candidates alone (no tail)."""
    return sample_row(RowMix(tuple(ids), tuple(lps), float("-inf"), 0, max(ids) + 1), temperature, top_p, 0, rng)


def test_temperature_zero_is_greedy():
    assert sample_token(IDS, LPS, 0.0, 1.0, make_rng(0)) == 3


def test_greedy_ties_break_toward_smaller_id():
    lps = [math.log(p) for p in (0.4, 0.1, 0.4, 0.1)]
    assert sample_token(IDS, lps, 0.0, 1.0, make_rng(0)) == 7
    assert sample_token([9, 2], [-1.0, -1.0], 0.0, 1.0, make_rng(0)) == 2


def test_every_seed_the_api_accepts_makes_a_generator_of_its_own():
    """The API takes seeds in [-2**63, 2**64): each makes a generator (negative ones too), seeds with distinct
    64-bit patterns give distinct draws, and a negative seed is its unsigned twin (-1 is 2**64 - 1)."""
    seeds = [-(2**63), -2, -1, 0, 1, 2**63 - 1]
    first = [make_rng(s).random() for s in seeds]
    assert first == [make_rng(s).random() for s in seeds]
    assert len(set(first)) == len(seeds)
    assert make_rng(-1).random() == make_rng(2**64 - 1).random()


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
    probs = [0.1, 0.5, 0.3, 0.1]
    assert nucleus(probs, 0.5) == [0.0, 0.5, 0.0, 0.0]
    assert nucleus(probs, 0.6) == [0.0, 0.5, 0.3, 0.0]
    assert nucleus([0.25, 0.5, 0.25, 0.0], 0.7) == [0.25, 0.5, 0.0, 0.0]    # ties: the first listed first
    rng = make_rng(1)
    assert {sample_token(IDS, LPS, 1.0, 0.5, rng) for _ in range(100)} == {3}


def test_excluded_candidates_are_never_sampled():
    lps = [float("-inf"), -0.1, float("-inf"), -3.0]
    rng = make_rng(0)
    assert {sample_token(IDS, lps, 2.0, 1.0, rng) for _ in range(300)} <= {3, 5}


# The whole mix: candidates plus a tail of equally likely tokens (gating.mix), and what is reported.

def _mixed(seed: int = 0, space: str = "probs"):
    from gating.mix import mix

    g = torch.Generator().manual_seed(seed)
    lps = [torch.log_softmax(torch.randn(V_MIX, generator=g) * 1.5, 0).topk(K_MIX) for _ in range(2)]
    ids = torch.stack([t.indices for t in lps])[None]
    values = torch.stack([t.values for t in lps])[None]
    return rows_of(mix(ids, values, torch.tensor([[0.6, 0.4]]), V_MIX, space), V_MIX)[0]


V_MIX, K_MIX = 48, 6


def _full(row: RowMix) -> torch.Tensor:
    """The mix as a dense [V] vector of logprobs."""
    lp = torch.full((V_MIX,), row.tail_logprob, dtype=torch.float64)
    lp[list(row.ids)] = torch.tensor(row.logprobs, dtype=torch.float64)
    return lp


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference nucleus over a dense vector: the smallest set, by descending prob, whose mass reaches top_p."""
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    keep_sorted = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    return torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted) & (probs > 0)


def _reference(full_lp: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """What sampling the full vocabulary would do: softmax(lp / T), top-k, then the nucleus over all V tokens."""
    p = torch.softmax(full_lp / temperature, 0)
    if top_k:
        order = torch.argsort(p, descending=True, stable=True)
        p = torch.zeros_like(p).index_copy(0, order[:top_k], p[order[:top_k]])
        p = p / p.sum()
    if top_p < 1.0:
        p = torch.where(nucleus_mask(p, top_p), p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [
    (1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 1.0, 0), (1.0, 0.5, 0), (1.0, 0.97, 0), (0.8, 0.99, 0),
    (1.0, 1.0, 5), (1.0, 1.0, 15), (1.0, 1.0, 30), (0.9, 0.95, 20), (1.0, 0.5, 40)])
def test_draw_weights_are_the_full_vocabulary_distribution(temperature, top_p, top_k):
    """Candidates and tail weigh exactly what the same tokens weigh when sampling the whole vocabulary, for
    any temperature, top-k and nucleus (reaching into the tail, they keep as much of it as they need)."""
    mixed = _mixed()
    assert 5 < len(mixed.ids) < 15                # top_k 5 ends inside the candidates, 15 and more in the tail
    cand, tail = draw_weights(mixed.logprobs, mixed.tail_logprob, mixed.tail_count, temperature, top_p, top_k)
    ref = _reference(_full(mixed), temperature, top_p, top_k)
    in_union = torch.zeros(V_MIX, dtype=torch.bool)
    in_union[list(mixed.ids)] = True
    mine = torch.zeros(V_MIX, dtype=torch.float64)
    mine[list(mixed.ids)] = torch.tensor(cand, dtype=torch.float64)
    total = sum(cand) + tail
    assert torch.allclose(mine[in_union] / total, ref[in_union], atol=1e-7)   # the mix is float32
    assert tail / total == pytest.approx(float(ref[~in_union].sum()), abs=1e-7)
    if top_p == 1.0 and top_k == 0:
        assert tail > 0.05                      # this mix leaves real mass outside the candidates
    if 0 < top_k <= len(mixed.ids):
        assert tail == 0.0 and sum(c > 0 for c in cand) == top_k


def test_sampling_the_mix_draws_tail_tokens_as_often_as_their_reported_mass():
    """Sampled tokens and reported logprobs come from one distribution: over many draws each token's frequency
    is exp(its reported logprob), tail tokens included (they are drawn outside the candidates, uniformly)."""
    mixed = _mixed(1)
    rng = make_rng(0)
    n = 20000
    counts = torch.zeros(V_MIX)
    for _ in range(n // 100):
        rows = [sample_row(mixed, 1.0, 1.0, 0, rng) for _ in range(100)]
        counts += torch.bincount(torch.tensor(rows), minlength=V_MIX)
    expected = _full(mixed).exp()
    in_union = torch.zeros(V_MIX, dtype=torch.bool)
    in_union[list(mixed.ids)] = True
    assert float((counts / n - expected).abs().max()) < 0.012
    tail_share = float(counts[~in_union].sum() / n)
    assert tail_share == pytest.approx(float(expected[~in_union].sum()), abs=0.012)
    assert int((counts[~in_union] > 0).sum()) == int((~in_union).sum())     # every tail token gets drawn


def test_the_nucleus_and_greedy_never_leave_the_candidates_when_they_suffice():
    mixed = _mixed(2)
    rng = make_rng(3)
    cand_mass = sum(math.exp(v) for v in mixed.logprobs)
    in_union = set(mixed.ids)
    assert {sample_row(mixed, 1.0, cand_mass * 0.9, 0, rng) for _ in range(500)} <= in_union
    greedy = sample_row(mixed, 0.0, 1.0, 0, rng)
    assert greedy == mixed.ids[max(range(len(mixed.ids)), key=mixed.logprobs.__getitem__)]


def test_a_top_k_within_the_candidates_samples_only_the_k_best():
    mixed = _mixed(5)
    best = {t for t, _ in mixed.alternatives(3)}
    rng = make_rng(1)
    assert {sample_row(mixed, 1.0, 1.0, 3, rng) for _ in range(300)} == best


def test_seeded_draws_from_the_mix_repeat():
    mixed = _mixed(4)
    a = [sample_row(mixed, 1.0, 1.0, 0, r) for r in [make_rng(9)] for _ in range(200)]
    b = [sample_row(mixed, 1.0, 1.0, 0, r) for r in [make_rng(9)] for _ in range(200)]
    assert a == b


def test_a_tail_draw_is_uniform_over_the_tokens_outside_the_candidates():
    taken = [0, 3, 4, 9]
    rng = make_rng(2)
    draws = [draw_outside(taken, 10, rng) for _ in range(3000)]
    assert set(draws) == {1, 2, 5, 6, 7, 8}
    assert min(draws.count(t) for t in set(draws)) > 400               # each ≈ 500
