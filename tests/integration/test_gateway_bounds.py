"""Every bounded number of the API at the edges of its documented range, on the real service (Serve + vLLM
experts), for the gated mix and for each expert's own engine.

At an edge the request is served (200; with a seed, the same text twice); one step past it, the answer is a
400 in OpenAI's error format that names the field. Afterwards every model still answers and /health is ok.
The schema fuzzers (test_gateway_fuzz.py) draw values at random and rarely land on a range's edge; these are
the cases they are unlikely to hit. The first run found one: `experts_per_token` above the number of experts
was refused without naming the field.
"""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

PROMPT = "def add(a, b):"
I64_MIN, U64_MAX, I32_MAX = -(2**63), 2**64 - 1, 2**31 - 1

# (field values, what they test) at the edges of the documented ranges: all must be served.
EDGES = [
    ({"seed": I64_MIN, "temperature": 1.0}, "the smallest seed"),
    ({"seed": U64_MAX, "temperature": 1.0}, "the largest seed"),
    ({"seed": -1, "temperature": 1.0}, "a negative seed"),
    ({"temperature": 0.0}, "greedy"),
    ({"temperature": 2.0, "seed": 7}, "the highest temperature"),
    ({"top_p": 1e-300, "seed": 7}, "the smallest top_p"),
    ({"top_p": 1.0, "seed": 7}, "top_p 1"),
    ({"top_k": -1, "seed": 7}, "top_k -1 (all)"),
    ({"top_k": 0, "seed": 7}, "top_k 0 (all)"),
    ({"top_k": 1, "seed": 7}, "top_k 1"),
    ({"top_k": I32_MAX, "seed": 7}, "the largest top_k"),
    ({"logprobs": 0}, "logprobs 0"),
    ({"logprobs": 20}, "the most logprobs"),
    ({"max_tokens": 1}, "one token"),
]
# One step past an edge: (field values, the field the 400 must name).
PAST = [
    ({"seed": I64_MIN - 1}, "seed"),
    ({"seed": U64_MAX + 1}, "seed"),
    ({"temperature": -0.001}, "temperature"),
    ({"temperature": 2.001}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.001}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": I32_MAX + 1}, "top_k"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
]


def _models(base: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]]


def _complete(base: str, model: str, extra: dict) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def _assert_refused(r: httpx.Response, field: str, what) -> None:
    assert r.status_code == 400, (what, r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and field in (error["param"] or ""), (what, error)


def test_every_bounded_field_is_served_at_its_edges_and_refused_one_step_past(live_gateway) -> None:
    base = live_gateway.base_url
    models = _models(base)
    experts = [m for m in models if m != "ensemble"]
    assert "ensemble" in models and experts, models
    for model in models:
        for extra, what in EDGES:
            r = _complete(base, model, extra)
            assert r.status_code == 200, (model, what, r.status_code, r.text)
            choice = r.json()["choices"][0]
            assert r.json()["usage"]["completion_tokens"] == extra.get("max_tokens", 2), (model, what, r.text)
            if extra.get("logprobs"):
                assert all(len(alts) == extra["logprobs"] for alts in choice["logprobs"]["top_logprobs"]), \
                    (model, what, choice["logprobs"])
            if "seed" in extra:
                again = _complete(base, model, extra)
                assert again.status_code == 200 and again.json()["choices"][0]["text"] == choice["text"], \
                    (model, what, choice["text"], again.text)
        for extra, field in PAST:
            _assert_refused(_complete(base, model, extra), field, (model, extra))

    # The ensemble's own field: 1 to the number of experts is served, 0 and one more are refused.
    for k in (1, len(experts)):
        r = _complete(base, "ensemble", {"experts_per_token": k, "return_routing": True})
        assert r.status_code == 200, (k, r.text)
        assert all(len(t["experts"]) <= k for t in r.json()["choices"][0]["routing"]["tokens"]), (k, r.text)
    for k in (0, len(experts) + 1):
        _assert_refused(_complete(base, "ensemble", {"experts_per_token": k}), "experts_per_token", k)

    # The chat endpoint's own bounds.
    chat = {"model": "ensemble", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{base}/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 20}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20, r.text
    for extra, field in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"max_tokens": 0}, "max_tokens")):
        r = httpx.post(f"{base}/v1/chat/completions", json={**chat, **extra}, timeout=120)
        _assert_refused(r, field, extra)

    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and health["in_flight"] == 0, health
    for model in models:
        r = _complete(base, model, {"max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, (model, r.text)
