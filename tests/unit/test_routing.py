"""orchestrator.routing.route_gated (served, per row in Python floats) against gating.mix.gate_weights (the
rule training and `ensemble eval` use), with experts down."""

import math

import pytest
import torch

from gating.mix import gate_weights
from orchestrator.routing import route_gated


@pytest.mark.parametrize("down", [(), (0,), (1, 3), (0, 1, 2)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_routes_follow_the_gate_rule_among_the_experts_that_are_up(down, k):
    g = torch.Generator().manual_seed(k * 10 + len(down))
    logits = torch.randn(16, 4, generator=g) * 2
    available = torch.tensor([e not in down for e in range(4)])
    routes = route_gated(logits, [k] * 16, available)
    up = int(available.sum())
    want_experts, want_weights = gate_weights(logits.masked_fill(~available, float("-inf")), min(k, up))
    wanted, _ = gate_weights(logits, k)
    probs = torch.softmax(logits, -1)
    for r, route in enumerate(routes):
        assert route.experts == tuple(want_experts[r].tolist())
        assert route.weights == pytest.approx(want_weights[r].tolist(), abs=1e-6)
        assert math.fsum(route.weights) == pytest.approx(1.0, abs=1e-12)
        assert route.entropy == pytest.approx(float(-(probs[r] * probs[r].log()).sum()), abs=1e-5)
        assert route.degraded == (set(wanted[r].tolist()) != set(route.experts))
    if down:
        assert any(route.degraded for route in routes)


def test_rows_take_their_own_k_and_no_expert_up_gives_no_route():
    logits = torch.tensor([[0.1, 2.0, 1.0, -1.0], [3.0, 0.0, 0.5, 0.2]])
    one, two = route_gated(logits, [1, 2], torch.ones(4, dtype=torch.bool))
    assert one.experts == (1,) and one.weights == (1.0,)
    assert two.experts == (0, 2) and two.weights[0] > two.weights[1]
    assert route_gated(logits, [1, 2], torch.zeros(4, dtype=torch.bool)) == [None, None]


@pytest.mark.parametrize("down", [(), (2,), (0, 3), (0, 1, 2)])
def test_a_round_routed_at_once_equals_the_same_rows_routed_one_by_one(down):
    """From VECTOR_ROWS rows on a round is routed in one compiled pass: the same experts, weights, entropy and
    degraded flag as row by row, with mixed k, ties and experts down."""
    from orchestrator import routing

    g = torch.Generator().manual_seed(7 + len(down))
    logits = (torch.randn(40, 4, generator=g) * 2).numpy()
    logits[3] = [1.0, 1.0, 0.5, 1.0]                      # ties: the lower index first
    logits[5] = [0.0, 0.0, 0.0, 0.0]
    ks = [(1, 2, 3, 4, 2)[i % 5] for i in range(40)]
    available = torch.tensor([e not in down for e in range(4)])
    at_once = routing.route_gated(logits, ks, available)
    assert len(ks) >= routing.VECTOR_ROWS
    one_by_one = [routing.route_gated(logits[i:i + 1], [k], available)[0] for i, k in enumerate(ks)]
    for a, b in zip(at_once, one_by_one):
        assert a.experts == b.experts and a.degraded == b.degraded
        assert a.weights == pytest.approx(b.weights, abs=1e-12)
        assert a.entropy == pytest.approx(b.entropy, abs=1e-12)
    uniform = routing.route_gated(logits, [2] * 40, available)         # the usual round: one k for every row
    assert [r.experts for r in uniform] == [routing.route_gated(logits[i:i + 1], [2], available)[0].experts
                                            for i in range(40)]


def test_an_expert_down_is_never_chosen_even_when_an_expert_up_has_a_minus_infinite_logit():
    """Down experts must not tie with an available expert at -inf (a mask by -inf would let the lower index win)."""
    import numpy as np

    from orchestrator import routing

    logits = np.array([[0.0, -np.inf, -np.inf, 1.0]] * routing.VECTOR_ROWS)
    available = torch.tensor([False, True, True, False])
    for r in routing.route_gated(logits, [2] * routing.VECTOR_ROWS, available):
        assert r.experts == (1, 2) and r.degraded


@pytest.mark.parametrize("rows", [1, 8])
def test_minus_infinite_gate_logits_give_finite_weights_and_entropy(rows):
    """A gate logit of -inf is probability 0: it adds nothing to the entropy (0·log 0 = 0, not NaN), and experts
    kept at -inf (the others down) share the weight equally instead of mixing NaN. Both the row-by-row path
    (1 row) and the one-pass path (VECTOR_ROWS rows)."""
    import math

    import numpy as np

    from orchestrator import routing

    up = torch.tensor([True, True, True, True])
    finite = np.array([[0.5, -np.inf, 1.0, -np.inf]] * rows)
    for r in routing.route_gated(finite, [2] * rows, up):
        assert r.experts == (2, 0) and not r.degraded
        p = [math.exp(1.0), math.exp(0.5)]
        assert r.weights == pytest.approx((p[0] / sum(p), p[1] / sum(p)))
        q = [x / sum(p) for x in p]
        assert r.entropy == pytest.approx(-sum(x * math.log(x) for x in q))
    for r in routing.route_gated(np.full((rows, 4), -np.inf), [2] * rows, up):
        assert r.experts == (0, 1) and r.weights == (0.5, 0.5) and r.entropy == pytest.approx(math.log(4))
    down = torch.tensor([False, True, True, False])
    for r in routing.route_gated(np.array([[0.0, -np.inf, -np.inf, 1.0]] * rows), [2] * rows, down):
        assert r.experts == (1, 2) and r.weights == (0.5, 0.5) and math.isfinite(r.entropy) and r.degraded
