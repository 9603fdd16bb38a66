"""Raw HTTP against the real application: SSE framing, bad input (OpenAI error bodies, 4xx, never 500,
experts still serving afterwards), health and metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration


def post(gw, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{gw.base_url}{path}", content=content, timeout=120,
                      headers={"Content-Type": "application/json", "Authorization": "Bearer sk-live-secret"}, **kw)


def sse_frames(gw, body: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{gw.base_url}/v1/completions", json=body, timeout=120) as r:
        raw = "".join(r.iter_text())
    return r, raw.split("\n\n")


def test_sse_framing(live_gateway) -> None:
    r, frames = sse_frames(live_gateway, {"model": "ensemble", "prompt": "x = ", "max_tokens": 6, "stream": True,
                                          "ignore_eos": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    events = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-2])
    assert len({e["id"] for e in events}) == 1 and events[-1]["usage"]["completion_tokens"] == 6
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"


BAD = [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": "ensemble", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "ensemble", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "ensemble", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "ensemble", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "ensemble", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": "ensemble", "prompt": [1, 2, 10**7]}, 400, "prompt"),
    ({"model": "ensemble", "prompt": "x", "stop": ""}, 400, "stop"),
    ({"prompt": "x"}, 400, "model"),
    ("{malformed", 400, None),
    ("null", 400, None),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_is_a_4xx_openai_error(live_gateway, body, status, param) -> None:
    r = post(live_gateway, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param


def test_oversized_body_is_413(live_gateway) -> None:
    limit = live_gateway.config.gateway.max_request_bytes
    r = post(live_gateway, "/v1/completions", {"model": "ensemble", "prompt": "a" * (limit + 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chat_prompt_beyond_the_context_is_rejected(live_gateway) -> None:
    long = "word " * (live_gateway.config.experts[0].max_model_len * 2)
    r = post(live_gateway, "/v1/chat/completions", {"model": "ensemble", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_bad_input_mid_load_leaves_every_stream_and_expert_healthy(live_gateway) -> None:
    good = {"model": "ensemble", "prompt": "import ", "max_tokens": 10, "ignore_eos": True, "stream": True}

    def stream_one(_):
        return sse_frames(live_gateway, good)[1][-2]

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_one, i) for i in range(4)]
        bad = [pool.submit(post, live_gateway, "/v1/completions", b) for b, _, _ in BAD]
        assert all(f.result().status_code < 500 for f in bad)
        assert all(f.result() == "data: [DONE]" for f in streams)
    assert httpx.get(f"{live_gateway.base_url}/health").json()["status"] == "ok"
    for name in ["ensemble", *[e.name for e in live_gateway.config.experts]]:
        ok = post(live_gateway, "/v1/completions", {"model": name, "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200, (name, ok.text)


STOPS_10K = [f"stop{i}" for i in range(10_000)]


def hostile_bodies(gw) -> list[tuple[str, str, object, int, str | None]]:
    """(name, model, body, status, param): the hostile inputs that would reach the engines if let through,
    for the ensemble and for an expert alone (its requests go straight to its vLLM engine)."""
    ctx = gw.config.experts[0].max_model_len
    schema = httpx.get(f"{gw.base_url}/openapi.json", timeout=30).json()["components"]["schemas"]
    vocab = schema["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["items"]["maximum"] + 1
    cases = []
    for model in ("ensemble", gw.config.experts[0].name):
        cases += [
            ("token_id_at_the_vocabulary_size", model, {"model": model, "prompt": [1, 2, vocab]}, 400,
             "prompt"),
            ("negative_token_id", model, {"model": model, "prompt": [[1, -1]]}, 400, "prompt"),
            ("max_tokens_beyond_the_context", model, {"model": model, "prompt": "x", "max_tokens": ctx}, 400,
             "max_tokens"),
            ("chat_beyond_the_context", model, {"model": model, "max_tokens": ctx, "messages": [
                {"role": "user", "content": "x"}]}, 400, "max_tokens"),
            ("10k_stop_strings", model, {"model": model, "prompt": "x", "stop": STOPS_10K}, 400, "stop"),
            ("non_utf8", model, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe"}',
             400, None),
        ]
    cases.append(("10_mb_body", "ensemble", {"model": "ensemble", "prompt": "x" * 10_000_000}, 413, None))
    return cases


@pytest.mark.parametrize("expert_alone", [False, True], ids=["ensemble", "expert"])
def test_hostile_input_is_refused_before_the_engines_and_they_keep_serving(live_gateway,
                                                                           expert_alone: bool) -> None:
    cases = [c for c in hostile_bodies(live_gateway) if (c[1] != "ensemble") == expert_alone]
    ids = {}
    for name, model, body, status, param in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        r = post(live_gateway, path, body)
        assert r.status_code == status, (name, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert param is None or err["param"] == param, (name, err)
        ids[r.headers["x-ensemble-request-id"]] = (name, status)
        ok = post(live_gateway, "/v1/completions",
                  {"model": model, "prompt": "a", "max_tokens": 2, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, (name, ok.text)
    records = live_gateway.records()
    for rid, (name, status) in ids.items():
        assert rid in records and records[rid].status == status and records[rid].output_ids == (), name
    assert httpx.get(f"{live_gateway.base_url}/health", timeout=30).json()["status"] == "ok"


def test_unknown_routes_and_methods_are_json_errors(live_gateway) -> None:
    r = httpx.get(f"{live_gateway.base_url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{live_gateway.base_url}/v1/chat/completions").status_code == 405


def test_metrics_are_prometheus_text(live_gateway) -> None:
    post(live_gateway, "/v1/completions", {"model": "ensemble", "prompt": "a", "max_tokens": 3, "ignore_eos": True})
    text = httpx.get(f"{live_gateway.base_url}/metrics").text
    for name in ("ensemble_requests_total", "ensemble_completion_tokens_total", "ensemble_expert_token_share",
                 "ensemble_gate_entropy_nats_bucket", "ensemble_time_to_first_token_seconds_bucket",
                 "ensemble_inter_token_latency_seconds_bucket", "ensemble_gate_info"):
        assert name in text, name
