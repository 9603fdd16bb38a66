"""Live gate swap through Serve's user_config (what retraining does): no restart, in-flight streams finish
with the gate they started with, new requests report the new version in system_fingerprint."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration


def add_gate_version(gate_dir) -> tuple[str, str]:
    """A new, differently-weighted version in the registry (not promoted) -> (old, new) version names."""
    from gating.checkpoint import GateRegistry

    registry = GateRegistry(gate_dir)
    current = registry.load_current()
    torch.manual_seed(1)
    state = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in current.state_dict.items()}
    new = dataclasses.replace(current, version=registry.next_version(), state_dict=state, parent=current.version)
    registry.add(new, promote=False)
    return current.version, new.version


GREEDY = {"model": "ensemble", "prompt": "while True:", "max_tokens": 200, "ignore_eos": True, "temperature": 0,
          "return_routing": True, "experts_per_token": 3}


def routing_of(live_gateway) -> list[dict]:
    """Per-token routing (expert -> weight) of GREEDY, answered by the gate that is live now."""
    r = httpx.post(f"{live_gateway.base_url}/v1/completions", json=GREEDY, timeout=300)
    assert r.status_code == 200, r.text
    return [t["experts"] for t in r.json()["choices"][0]["routing"]["tokens"]]


def test_gate_swaps_live_without_restart_and_running_requests_keep_their_gate(live_gateway) -> None:
    gate = live_gateway.config.gate.model_dump()
    old, new = add_gate_version(live_gateway.gate_dir)
    created = httpx.get(f"{live_gateway.base_url}/v1/models").json()["data"][0]["created"]
    old_routing = routing_of(live_gateway)
    first_byte = threading.Event()
    swapped_at: list[float] = []

    def long_stream():
        with httpx.stream("POST", f"{live_gateway.base_url}/v1/completions", json={**GREEDY, "stream": True},
                          timeout=300) as r:
            parts = []
            for chunk in r.iter_text():
                first_byte.set()
                parts.append(chunk)
        return "".join(parts), time.monotonic()

    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(long_stream)
            assert first_byte.wait(120)
            live_gateway.set_gateway_user_config({"gate": {**gate, "version": new}, "draining": False})
            assert live_gateway.fingerprint() == new
            swapped_at.append(time.monotonic())
            raw, ended_at = in_flight.result()
        new_routing = routing_of(live_gateway)
        assert new_routing != old_routing, "the new gate must route differently, or this test proves nothing"
        assert ended_at > swapped_at[0], "the stream ended before the swap: make it longer"
        events = [json.loads(f.removeprefix("data: ")) for f in raw.split("\n\n") if f and f != "data: [DONE]"]
        assert raw.endswith("data: [DONE]\n\n") and events[-1]["choices"][0]["finish_reason"] == "length"
        assert {e["system_fingerprint"] for e in events} == {old}          # kept the gate it started with
        # ... and was routed by it, token for token, also after the swap
        streamed = [t["experts"] for e in events for t in (e["choices"][0].get("routing") or {}).get("tokens", [])]
        assert streamed == old_routing
        assert httpx.get(f"{live_gateway.base_url}/v1/models").json()["data"][0]["created"] == created
        metrics = httpx.get(f"{live_gateway.base_url}/metrics").text
        assert f'ensemble_gate_info{{version="{new}"}} 1.0' in metrics
    finally:
        live_gateway.set_gateway_user_config({"gate": gate, "draining": False})
    assert live_gateway.fingerprint() == old


def test_a_bad_gate_version_keeps_the_live_gate_and_says_so(live_gateway) -> None:
    gate = live_gateway.config.gate.model_dump()
    before = live_gateway.fingerprint()
    try:
        live_gateway.set_gateway_user_config({"gate": {**gate, "version": "gate-v999"}, "draining": False})
        health = httpx.get(f"{live_gateway.base_url}/health").json()
        assert health["status"] == "ok" and health["gate_version"] == before
        assert "gate-v999" in health["gate_error"]
        assert live_gateway.fingerprint() == before
    finally:
        live_gateway.set_gateway_user_config({"gate": gate, "draining": False})
    health = httpx.get(f"{live_gateway.base_url}/health").json()
    assert "gate_error" not in health and health["gate_version"] == before
