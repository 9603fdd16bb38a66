"""GatewayMetrics: what the per-token counters export, read back through the Prometheus text format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.metrics import GatewayMetrics
from orchestrator.types import GateDecision, TokenEvent


def samples(m: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    text = m.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def event(experts: tuple[str, ...], weights: tuple[float, ...], degraded: bool = False) -> TokenEvent:
    return TokenEvent("r", 0, 5, -1.0, GateDecision(experts, weights, 0.5, degraded), (), None)


def test_token_counters_and_the_share_are_exported_per_label() -> None:
    m = GatewayMetrics()
    m.token("ensemble", event(("code", "prose"), (0.75, 0.25)), 0.2, True)
    m.token("ensemble", event(("code", "math"), (0.5, 0.5), degraded=True), 0.01, False)
    m.token("ensemble", event(("prose", "math"), (0.6, 0.4)), 0.02, False)
    m.token("code", event(("code",), (1.0,)), 0.3, True)                  # another model: not in the share
    s = samples(m)
    assert s[("ensemble_completion_tokens_total", (("model", "ensemble"),))] == 3
    assert s[("ensemble_completion_tokens_total", (("model", "code"),))] == 1
    assert s[("ensemble_degraded_tokens_total", (("model", "ensemble"),))] == 1
    assert ("ensemble_degraded_tokens_total", (("model", "code"),)) not in s      # no series before a degraded token
    assert s[("ensemble_expert_tokens_total", (("expert", "code"),))] == 3
    assert s[("ensemble_expert_token_weight_total", (("expert", "code"),))] == pytest.approx(2.25)
    assert s[("ensemble_time_to_first_token_seconds_count", (("model", "ensemble"),))] == 1
    assert s[("ensemble_inter_token_latency_seconds_count", (("model", "ensemble"),))] == 2
    assert s[("ensemble_inter_token_latency_seconds_sum", (("model", "ensemble"),))] == pytest.approx(0.03)
    shares = {dict(k[1])["expert"]: v for k, v in s.items() if k[0] == "ensemble_expert_token_share"}
    assert shares == pytest.approx({"code": 1.25 / 3, "prose": 0.85 / 3, "math": 0.9 / 3})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_two_replicas_metrics_do_not_share_state() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.token("ensemble", event(("code", "prose"), (0.5, 0.5)), 0.1, True)
    assert ("ensemble_completion_tokens_total", (("model", "ensemble"),)) not in samples(b)
    assert not [k for k in samples(b) if k[0] == "ensemble_expert_token_share"]
