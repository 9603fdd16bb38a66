"""The retraining demonstration (README, "Retraining the gate"), end to end on the live test service:

1. measure the live gate on probe prompts of the shifted traffic (echo scoring through the REST API);
2. replay a few hundred `devtools` prompts (JSON and code only) through the REST API;
3. run `ensemble retrain` on exactly that window of the log while streams are in flight;
4. the new gate is promoted because held-out NLL improved, the live service reports it in
   system_fingerprint, its routing moved toward the experts the data favours, live NLL on the probes fell,
   and every in-flight stream completed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import yaml

from deploy.replay import echo_nll, replay, shift_prompts

pytestmark = pytest.mark.integration
N_TRAFFIC, N_PROBES = 300, 32


def stream_until(base_url: str, stop: threading.Event, results: list) -> None:
    """Keep one streaming request in flight until `stop`; record (start, end, fingerprints, finished)."""
    body = {"model": "ensemble", "prompt": '{"service": "', "max_tokens": 48, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        start, raw = time.time(), []
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as r:
                raw = list(r.iter_text())
        except httpx.HTTPError as exc:
            results.append((start, time.time(), {f"error: {exc}"}, False))
            continue
        text = "".join(raw)
        events = [json.loads(f.removeprefix("data: ")) for f in text.split("\n\n") if f and f != "data: [DONE]"]
        done = text.endswith("data: [DONE]\n\n") and events[-1]["choices"][0]["finish_reason"] == "length"
        results.append((start, time.time(), {e.get("system_fingerprint") for e in events}, done))


def test_traffic_shift_retrain_promotes_a_better_gate_and_swaps_it_live(live_gateway, tmp_path) -> None:
    from deploy.config import load_config
    from deploy.retrain_job import retrain_from_log
    from gating.checkpoint import GateRegistry
    from orchestrator.cli import parse_command
    from tests.integration.conftest import DEMO

    url, gate = live_gateway.base_url, live_gateway.config.gate.model_dump()
    # The job reads the same YAML a user would give it; it must describe the running app exactly, or the
    # swap would be a redeploy instead of an in-place user_config update.
    config_path = tmp_path / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(live_gateway.deploy_config.model_dump(mode="json")))
    assert load_config(config_path).serve_config() == live_gateway.deploy_config.serve_config()

    probes = shift_prompts(DEMO, "devtools", N_PROBES, seed=1, split="probe")
    traffic = shift_prompts(DEMO, "devtools", N_TRAFFIC, seed=0, split="traffic")
    old = live_gateway.fingerprint()
    nll_before, probe_tokens, st = asyncio.run(echo_nll(url, probes))
    assert st.ok == N_PROBES and set(st.fingerprints) == {old}

    # 2. The shifted traffic, through the REST API; every request must be served and logged once.
    since = time.time()
    stats = asyncio.run(replay(url, traffic, concurrency=8, max_tokens=4))
    assert stats.ok == N_TRAFFIC, stats.errors[:3]
    until = time.time()
    live_gateway.flush_log()
    window = [r for r in live_gateway.records().values() if since <= r.created < until]
    assert len(window) == N_TRAFFIC and all(r.error is None for r in window)

    # 3. Retrain as `ensemble retrain --since --until --json` does, with streams in flight the whole time.
    stop, streams = threading.Event(), []
    threads = [threading.Thread(target=stream_until, args=(url, stop, streams)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        _, args = parse_command("retrain", ["--config", str(config_path), "--since", str(since), "--until",
                                            str(until), "--report", str(tmp_path / "shift.png"), "--json"])
        result = asyncio.run(retrain_from_log(args))
        # Keep the streams going until one that started after the swap has finished (bounded wait).
        swapped, deadline = (result.get("swap") or {}).get("finished", time.time()), time.monotonic() + 120
        while not any(start > swapped and done for start, _, _, done in list(streams)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    try:
        print("retrain result:", json.dumps(result))
        # 4a. Promoted because the held-out requests (never fitted, never used for early stopping) improved.
        assert result["promoted"] and result["swapped_live"] and result["old_version"] == old
        assert result["heldout_tokens"] > 1000 and result["train_sequences"] > 150
        gain = result["heldout_nll_old"] - result["heldout_nll_new"]
        assert gain >= 0.02, f"held-out NLL/token improved by only {gain:.4f} nats"
        # 4b. Routing moved the way the data says: more of the gate's weight lands on the per-token oracle expert.
        assert result["routing_new"]["oracle_weight"] > result["routing_old"]["oracle_weight"]
        assert (tmp_path / "shift.png").stat().st_size > 10_000
        # 4c. The live service answers with the new version, and its NLL on the unseen probes fell.
        new = result["new_version"]
        assert live_gateway.fingerprint() == new
        nll_after, tokens_after, st = asyncio.run(echo_nll(url, probes))
        assert tokens_after == probe_tokens and set(st.fingerprints) == {new}
        print(f"live probe NLL/token {nll_before:.4f} -> {nll_after:.4f} on {probe_tokens} tokens")
        assert nll_after < nll_before
        # 4d. Every stream completed, including ones in flight across the swap (started on the old gate).
        assert streams and all(done for *_, done in streams), [s for s in streams if not s[3]][:3]
        swap = result["swap"]
        across = [s for s in streams if s[0] < swap["started"] < s[1]]
        assert across and all(fps == {old} for _, _, fps, _ in across)     # kept the gate they started with
        assert all(len(fps) == 1 for *_, fps, _ in streams)       # one gate per response, never a mix
    finally:
        # Roll back the way a user would (`ensemble gate-history --restore`), which also swaps the live service.
        restore, args = parse_command("gate-history", ["--config", str(config_path), "--restore", old])
        assert restore.run(args) == 0
        assert GateRegistry(live_gateway.gate_dir).current() == old
    assert live_gateway.fingerprint() == old
    live_gateway.set_gateway_user_config({"gate": gate, "draining": False})      # the fixture's own user_config
