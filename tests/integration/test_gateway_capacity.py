"""Overload and "nothing left" on the real service (Serve + vLLM experts), with real sockets and real signals.

- Overload: the gateway runs `max_active` generations; further requests wait in a bounded queue; one more
  than the queue holds is refused at once with a 429 (OpenAI's error format, Retry-After), never a 500;
  the queue depth and the refusals are on /metrics; a freed slot goes to the first waiter.
- Nothing left: when no expert that could serve a request answers (`model=math` with math's only replica
  hung by SIGSTOP), the request gets a 503 with Retry-After, streamed or not, not a 500 and not a hung
  stream; afterwards (SIGCONT) the service serves again without operator action.

Runs inside the session's live gateway (tests/integration/gateway_fixtures.py: max_queued = LIVE_MAX_QUEUED).
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.faults import (
    health,
    kill,
    metric,
    read_first_event,
    replicas,
    reset,
    send_completion,
    wait_all_experts_ok,
    wait_for,
)
from tests.integration.gateway_fixtures import LIVE_MAX_QUEUED

pytestmark = pytest.mark.integration


@pytest.fixture
def healthy(live_gateway):
    names = [e.name for e in live_gateway.config.experts]
    wait_all_experts_ok(live_gateway.base_url, names)
    yield live_gateway
    wait_for("every request to be finished", lambda: health(live_gateway.base_url)["in_flight"] == 0, 300)
    wait_all_experts_ok(live_gateway.base_url, names)


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) >= 1, r.headers
    error = r.json()["error"]
    assert error["message"] and error["type"], error
    return error


def test_a_full_gateway_queues_then_refuses_with_429_and_a_freed_slot_goes_to_a_waiter(healthy) -> None:
    gw = healthy
    max_active = gw.config.gateway.max_active
    # Slow streams (every token asks all four experts) as long as the context allows: at 48 at once on two
    # cores they run for minutes, so they hold their slots until the test cuts them.
    body = {"model": "ensemble", "prompt": "def main():", "max_tokens": gw.config.experts[0].max_model_len - 16,
            "experts_per_token": len(gw.config.experts), "ignore_eos": True, "stream": True}
    running, waiting = [], []
    rejected_before = metric(gw.base_url, "ensemble_admission_rejected_total")
    try:
        with ThreadPoolExecutor(16) as pool:
            running = list(pool.map(lambda _: send_completion(gw.base_url, body), range(max_active)))
            list(pool.map(read_first_event, running))                     # every one is admitted and streaming
        for i in range(LIVE_MAX_QUEUED):              # one at a time, so their order in the queue is known
            waiting.append(send_completion(gw.base_url, body))
            wait_for(f"{i + 1} requests waiting in the admission queue",
                     lambda n=i + 1: metric(gw.base_url, "ensemble_admission_queued") == n, 60, poll_s=0.1)

        r = httpx.post(f"{gw.base_url}/v1/completions", json={**body, "stream": False}, timeout=60)
        error = _assert_openai_error(r, 429)
        assert "waiting" in error["message"], error
        assert metric(gw.base_url, "ensemble_admission_rejected_total") == rejected_before + 1

        reset(running.pop(0))                                  # a client goes away: its slot is freed ...
        wait_for("the first waiter to get the freed slot",
                 lambda: metric(gw.base_url, "ensemble_admission_queued") == LIVE_MAX_QUEUED - 1, 60)
        read_first_event(waiting[0])                           # ... and the first in line is streaming now
    finally:
        for s in running + waiting:
            reset(s)


def test_when_no_expert_can_answer_the_request_gets_503_with_retry_after(healthy) -> None:
    """`model=math` can only be served by math: with its only replica hung (SIGSTOP) nothing can answer it.
    Released (SIGCONT) well before Serve's health check would replace it, so no engine restarts."""
    gw = healthy
    (victim,) = replicas(gw.app_name, "expert-math")
    kill(victim.pid, signal.SIGSTOP)
    try:
        for stream in (False, True):
            r = httpx.post(f"{gw.base_url}/v1/completions", timeout=120,
                           json={"model": "math", "prompt": "x = ", "max_tokens": 8, "stream": stream})
            _assert_openai_error(r, 503)
        report = health(gw.base_url)
        assert report["status"] != "ok" and report["experts"]["math"]["state"] != "ok", report
    finally:
        try:
            kill(victim.pid, signal.SIGCONT)
        except ProcessLookupError:      # Serve replaced it already
            pass
    # the fixture then waits until every expert answers again: recovery needs no operator
