"""Gateway and expert metrics reach Ray's metrics pipeline (the node's metrics agent), tagged per replica, so
one Prometheus scrape of the cluster sees every replica on every node."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.faults import wait_for

pytestmark = pytest.mark.integration


def agent_metrics() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def test_gateway_and_expert_metrics_are_exported_through_ray_per_replica(live_gateway) -> None:
    from deploy.replicas import replicas

    r = httpx.post(f"{live_gateway.base_url}/v1/completions", timeout=120,
                   json={"model": "ensemble", "prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    (gateway,) = replicas(live_gateway.app_name, "gateway")

    def exported() -> str | None:
        text = agent_metrics()
        ok = [line for line in text.splitlines() if line.startswith("ray_ensemble_completion_tokens")
              and f'replica="{gateway.replica_id}"' in line]
        sessions = [line for line in text.splitlines() if line.startswith("ray_ensemble_expert_open_sessions")]
        return text if ok and sessions else None

    text = wait_for("the gateway's and experts' metrics in Ray's metrics agent", exported, timeout_s=120, poll_s=2)
    experts = {line.split('expert="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("ray_ensemble_expert_open_sessions") and 'expert="' in line}
    assert {e.name for e in live_gateway.config.experts} <= experts, experts
