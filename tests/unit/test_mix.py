"""Pure-function tests of gating.mix: the mixing rule shared by serving and training."""

import math

import pytest
import torch

from gating.mix import expert_floor, gate_weights, logprob_of, mix

V = 50


def topk(seed: int, k: int = 8):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(V, generator=g) * 2, 0)
    v, i = lp.topk(k)
    return i, v, lp


def full_distribution(mixed, row=0) -> torch.Tensor:
    """Expand a Mixed row to a dense [V] vector of probabilities."""
    p = torch.full((V,), float(mixed.tail_logprob[row].exp()))
    for c, lp, first in zip(mixed.cand_ids[row], mixed.cand_logprobs[row], mixed.first[row]):
        if first:
            p[c] = lp.exp()
    return p


def two_experts(k=8):
    i1, v1, _ = topk(1, k)
    i2, v2, _ = topk(2, k)
    return torch.stack([i1, i2])[None], torch.stack([v1, v2])[None]


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_weights_one_zero_reproduce_the_expert(space):
    ids, lps = two_experts()
    mixed = mix(ids, lps, torch.tensor([[1.0, 0.0]]), V, space)
    floor = expert_floor(lps[0, 0], V)
    for tok in range(V):
        hit = (ids[0, 0] == tok).nonzero()
        expected = lps[0, 0, hit[0, 0]] if len(hit) else floor
        assert logprob_of(mixed, torch.tensor([tok]))[0] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("w", [0.5, 0.8, 0.05])
def test_mixture_is_a_distribution_over_the_full_vocabulary(space, w):
    ids, lps = two_experts()
    mixed = mix(ids, lps, torch.tensor([[w, 1 - w]]), V, space)
    assert float(full_distribution(mixed).sum()) == pytest.approx(1.0, abs=1e-5)


def test_probability_space_is_the_weighted_average_of_probabilities():
    ids, lps = two_experts()
    mixed = mix(ids, lps, torch.tensor([[0.3, 0.7]]), V, "probs", interp=0.0)     # the plain floor
    floors = expert_floor(lps[0], V)
    for tok in range(V):
        p = 0.0
        for s, w in enumerate((0.3, 0.7)):
            hit = (ids[0, s] == tok).nonzero()
            p += w * math.exp(float(lps[0, s, hit[0, 0]] if len(hit) else floors[s]))
        assert float(logprob_of(mixed, torch.tensor([tok]))[0].exp()) == pytest.approx(p, rel=1e-4)


def test_logit_space_adds_weighted_logprobs_then_normalises():
    ids, lps = two_experts()
    mixed = mix(ids, lps, torch.tensor([[0.5, 0.5]]), V, "logits", interp=0.0)
    floors = expert_floor(lps[0], V)
    raw = torch.zeros(V)
    for tok in range(V):
        for s in range(2):
            hit = (ids[0, s] == tok).nonzero()
            raw[tok] += 0.5 * float(lps[0, s, hit[0, 0]] if len(hit) else floors[s])
    expected = torch.log_softmax(raw, 0)
    got = torch.log(full_distribution(mixed))
    assert torch.allclose(got, expected, atol=1e-5)


def expert_representation(ids, lps, weights, s, interp):
    """Dense [V] probabilities that expert s is taken to assign under the cross-listed rule."""
    from gating.mix import cross_listed_values, first_occurrence

    cand = ids.reshape(1, -1)
    values, floor = cross_listed_values(cand, first_occurrence(cand), ids, lps, weights, V, interp)
    p = torch.full((V,), float(floor[0, s].exp()))
    for c, v in zip(cand[0].tolist(), values[0, s]):
        p[c] = v.exp()
    return p


@pytest.mark.parametrize("interp", [0.25, 0.75, 1.0])
def test_cross_listed_guess_keeps_each_expert_a_distribution_between_floor_and_kth(interp):
    ids, lps = two_experts()
    weights = torch.tensor([[0.4, 0.6]])
    for s in range(2):
        p = expert_representation(ids, lps, weights, s, interp)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
        other = [t for t in ids[0, 1 - s].tolist() if t not in ids[0, s].tolist()]
        assert other
        for t in other:
            assert float(expert_floor(lps[0, s], V).exp()) <= float(p[t]) <= float(lps[0, s, -1].exp()) + 1e-7
        for t, v in zip(ids[0, s].tolist(), lps[0, s]):               # its own top-k untouched
            assert float(p[t]) == pytest.approx(float(v.exp()), rel=1e-5)


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_cross_listed_guess_raises_the_tokens_the_other_expert_lists(space):
    ids, lps = two_experts()
    w = torch.tensor([[0.5, 0.5]])
    plain, guessed = mix(ids, lps, w, V, space, interp=0.0), mix(ids, lps, w, V, space, interp=0.75)
    only_b = torch.tensor([t for t in ids[0, 1].tolist() if t not in ids[0, 0].tolist()])
    assert bool((logprob_of(guessed, only_b[:1]) > logprob_of(plain, only_b[:1])).all())
    assert float(full_distribution(guessed).sum()) == pytest.approx(1.0, abs=1e-5)


def test_shared_candidates_are_counted_once():
    i1, v1, _ = topk(1)
    ids = torch.stack([i1, i1])[None]
    lps = torch.stack([v1, v1])[None]
    mixed = mix(ids, lps, torch.tensor([[0.5, 0.5]]), V, "logits")
    assert int(mixed.first.sum()) == len(i1)
    assert torch.allclose(logprob_of(mixed, i1), v1, atol=1e-5)


def test_swapping_experts_and_weights_gives_the_same_mix():
    ids, lps = two_experts()
    a = mix(ids, lps, torch.tensor([[0.3, 0.7]]), V, "logits")
    b = mix(ids.flip(1), lps.flip(1), torch.tensor([[0.7, 0.3]]), V, "logits")
    toks = torch.arange(V)
    assert torch.allclose(logprob_of(a, toks[:1]), logprob_of(b, toks[:1]), atol=1e-6)
    assert torch.allclose(full_distribution(a), full_distribution(b), atol=1e-6)


def test_floor_never_exceeds_the_kth_logprob():
    for seed in range(20):
        _, v, _ = topk(seed, 5)
        assert float(expert_floor(v, V)) <= float(v[-1]) + 1e-6


def test_mix_is_differentiable_in_the_weights():
    ids, lps = two_experts()
    logits = torch.zeros(1, 2, requires_grad=True)
    mixed = mix(ids, lps, torch.softmax(logits, -1), V, "logits")
    logprob_of(mixed, ids[:, 1, :1].reshape(1)).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_gate_weights_follow_mixtral_rule():
    experts, weights = gate_weights(torch.tensor([[0.1, 2.0, 1.0, -1.0]]), 2)
    assert experts.tolist() == [[1, 2]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    with pytest.raises(ValueError, match="top_k"):
        gate_weights(torch.zeros(1, 4), 5)
    _, w1 = gate_weights(torch.zeros(1, 4), 1)
    assert w1.tolist() == [[1.0]]
