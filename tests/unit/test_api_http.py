"""The gateway's HTTP surface over the real engine with in-process deterministic experts (no Ray, no vLLM).

Covers OpenAI response shapes, SSE framing, routing, echo scoring, stop strings, bad input (4xx, never 500,
engine still alive), the traffic log (every request exactly once, same tokens as the response) and metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import httpx
import pytest

from orchestrator.gateway import build_fastapi
from orchestrator.metrics import GatewayMetrics
from orchestrator.service import REQUEST_ID_HEADER, GatewayCore, GatewaySettings
from orchestrator.store import TrafficLog, iter_records
from orchestrator.stream import TextCodec
from tests.gateway_fakes import EXPERT_NAMES, byte_level_tokenizer, make_engine, random_gate

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
async def gw(tmp_path_factory):
    tok = byte_level_tokenizer()
    engine = make_engine(len(tok), gate=random_gate(len(tok)), max_model_len=MAX_MODEL_LEN)
    await engine.start()
    db = tmp_path_factory.mktemp("log") / "traffic.db"
    core = GatewayCore(engine, TextCodec(tok), TrafficLog(db), GatewayMetrics(),
                       GatewaySettings(str(db), max_request_bytes=20_000))
    transport = httpx.ASGITransport(app=build_fastapi(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield SimpleNamespace(client=client, core=core, db=db, transport=transport, sent=[])
    await core.aclose()


async def post(gw, path: str, body) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    r = await gw.client.post(path, content=content, headers={"content-type": "application/json",
                                                            "authorization": "Bearer sk-secret"})
    gw.sent.append(r)
    return r


async def records(gw) -> dict:
    assert await asyncio.to_thread(gw.core.log.flush)
    return {r.request_id: r for r in iter_records(gw.db)}


def parse_sse(text: str) -> list[dict]:
    frames = text.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]", "stream must end with data: [DONE]"
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-1])
    return [json.loads(f[len("data: "):]) for f in frames[:-2]]


def completion(**kw) -> dict:
    return {"model": "ensemble", "prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **kw}


def chat(**kw) -> dict:
    return {"model": "ensemble", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10,
            "temperature": 0, "ignore_eos": True, **kw}


async def test_models_lists_the_ensemble_and_each_expert(gw) -> None:
    r = await gw.client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["ensemble", *EXPERT_NAMES]
    assert (await gw.client.get("/v1/models/code")).json()["id"] == "code"
    assert (await gw.client.get("/v1/models/nope")).status_code == 404


async def test_completion_reports_usage_fingerprint_and_is_logged_with_the_same_tokens(gw) -> None:
    r = await post(gw, "/v1/completions", completion(logprobs=2))
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["system_fingerprint"] == "gate-test" and body["id"] == r.headers[REQUEST_ID_HEADER]
    usage, choice = body["usage"], body["choices"][0]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert sum(usage["expert_tokens"].values()) == 2 * 12            # top-2 experts per token
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["tokens"]) == 12
    assert all(len(t) <= 2 for t in choice["logprobs"]["top_logprobs"])
    rec = (await records(gw))[body["id"]]
    assert rec.output_text == choice["text"] and len(rec.output_ids) == 12
    assert list(rec.logprobs) == pytest.approx(choice["logprobs"]["token_logprobs"])
    assert rec.gate_version == "gate-test" and rec.status == 200 and rec.finish_reason == "length"
    assert rec.params["tokenizer_fingerprint"] == "fp-shared" and rec.params["logprobs"] == 2
    assert "authorization" not in json.dumps(rec.params).lower() and "sk-secret" not in json.dumps(rec.params)


async def test_stream_is_well_framed_and_matches_the_non_streamed_text(gw) -> None:
    params = completion(temperature=0.9, seed=7, max_tokens=16)
    whole = (await post(gw, "/v1/completions", params)).json()
    r = await post(gw, "/v1/completions", {**params, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert {c["id"] for c in chunks} == {r.headers[REQUEST_ID_HEADER]}
    rec = (await records(gw))[r.headers[REQUEST_ID_HEADER]]
    # (the store keeps a NUL character as U+FFFD, orchestrator/store/records.py; the demo vocabulary has one)
    assert rec.output_text == whole["choices"][0]["text"].replace("\x00", "\ufffd") and len(rec.output_ids) == 16


async def test_chat_stream_opens_with_the_role_and_closes_with_finish_reason(gw) -> None:
    r = await post(gw, "/v1/chat/completions", chat(stream=True, logprobs=True, top_logprobs=2))
    chunks = parse_sse(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    n_lp = sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:] if c["choices"][0]["logprobs"])
    assert n_lp == 10
    rec = (await records(gw))[chunks[0]["id"]]
    assert rec.endpoint == "chat.completions" and rec.prompt_text.endswith("Assistant:")
    assert rec.params["messages"] == [{"role": "user", "content": "Say hi"}]


async def test_return_routing_lists_each_tokens_experts_and_weights(gw) -> None:
    body = (await post(gw, "/v1/chat/completions", chat(return_routing=True))).json()
    routing = body["choices"][0]["routing"]
    assert routing["gate_version"] == "gate-test" and len(routing["tokens"]) == 10
    for i, tok in enumerate(routing["tokens"]):
        assert tok["index"] == i and len(tok["experts"]) == 2 and set(tok["experts"]) <= set(EXPERT_NAMES)
        weights = list(tok["experts"].values())
        assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(1, abs=1e-3)
    assert sum(routing["share"].values()) == pytest.approx(1, abs=1e-3)


async def test_an_expert_model_is_served_by_that_expert_alone(gw) -> None:
    body = (await post(gw, "/v1/completions", completion(model="math", return_routing=True))).json()
    assert body["model"] == "math" and body["usage"]["expert_tokens"] == {"math": 12}
    assert {tuple(t["experts"].items()) for t in body["choices"][0]["routing"]["tokens"]} == {(("math", 1.0),)}


async def test_echo_with_zero_max_tokens_returns_prompt_logprobs(gw) -> None:
    prompt = "The quick brown fox"
    body = (await post(gw, "/v1/completions", completion(prompt=prompt, echo=True, max_tokens=0, logprobs=3))).json()
    ids = gw.core.codec.encode(prompt)
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == prompt and body["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = await gw.core.engine.score("check", ids, "ensemble", 3)
    assert lp["token_logprobs"][1:] == pytest.approx([s for s, _ in expected[1:]])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])


async def test_echo_scores_a_prompt_that_fills_the_whole_context(gw) -> None:
    """Scoring generates nothing, so a prompt of exactly the context length can be scored (echo, max_tokens 0);
    one token more is refused as beyond the context."""
    ids = [5 + i % 50 for i in range(MAX_MODEL_LEN)]
    body = (await post(gw, "/v1/completions", completion(prompt=ids, echo=True, max_tokens=0, logprobs=1))).json()
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == MAX_MODEL_LEN, body
    over = await post(gw, "/v1/completions", completion(prompt=ids + [5], echo=True, max_tokens=0, logprobs=1))
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"


async def test_echo_with_generation_returns_prompt_then_completion_logprobs(gw) -> None:
    prompt = "The quick brown fox"
    only = (await post(gw, "/v1/completions", completion(prompt=prompt, echo=True, max_tokens=0, logprobs=2))).json()
    body = (await post(gw, "/v1/completions", completion(prompt=prompt, echo=True, max_tokens=5, logprobs=2,
                                                          temperature=0.0))).json()
    plain = (await post(gw, "/v1/completions", completion(prompt=prompt, max_tokens=5, logprobs=2,
                                                           temperature=0.0))).json()
    lp, n_prompt = body["choices"][0]["logprobs"], body["usage"]["prompt_tokens"]
    assert body["choices"][0]["text"] == prompt + plain["choices"][0]["text"]
    assert len(lp["tokens"]) == n_prompt + body["usage"]["completion_tokens"]
    assert lp["token_logprobs"][:n_prompt] == only["choices"][0]["logprobs"]["token_logprobs"]
    assert lp["token_logprobs"][n_prompt:] == plain["choices"][0]["logprobs"]["token_logprobs"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][n_prompt] == len(prompt)


async def test_stop_string_truncates_the_output_and_the_log(gw) -> None:
    base = (await post(gw, "/v1/completions", completion(max_tokens=30))).json()["choices"][0]["text"]
    stop = base[10:13]
    body = (await post(gw, "/v1/completions", completion(max_tokens=30, stop=[stop]))).json()
    assert body["choices"][0]["text"] == base[:base.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert (await records(gw))[body["id"]].output_text == body["choices"][0]["text"]


@pytest.mark.parametrize("body, status, param", [
    (completion(model="gpt-4"), 404, "model"),
    (completion(n=2), 400, "n"),
    (completion(temperature=5), 400, "temperature"),
    (completion(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (completion(prompt=[5, 99999]), 400, "prompt"),
    (chat(messages=[{"role": "user", "content": "x " * 400}]), 400, None),
    ({"prompt": "no model"}, 400, "model"),
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ("", 400, None),
])
async def test_bad_input_gets_an_openai_error_and_the_engine_keeps_working(gw, body, status, param) -> None:
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = await post(gw, path, body)
    err = r.json()["error"]
    assert r.status_code == status and err.keys() == {"message", "type", "param", "code"}
    assert param is None or err["param"] == param
    assert (await post(gw, "/v1/completions", completion(max_tokens=2))).status_code == 200


async def test_context_overflow_message_is_openai_style(gw) -> None:
    r = await post(gw, "/v1/completions", completion(max_tokens=MAX_MODEL_LEN))
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in r.json()["error"]["message"]


async def test_oversized_body_is_413_and_unknown_routes_are_json_errors(gw) -> None:
    r = await post(gw, "/v1/completions", completion(prompt="x" * 30_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = await gw.client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert (await gw.client.get("/v1/completions")).status_code == 405


async def test_failed_requests_are_logged_with_their_status(gw) -> None:
    r = await post(gw, "/v1/completions", completion(n=3))
    rec = (await records(gw))[r.headers[REQUEST_ID_HEADER]]
    assert r.status_code == 400 and rec.status == 400 and "n=1" in rec.error and rec.output_ids == ()
    r = await post(gw, "/v1/completions", "{oops")
    rec = (await records(gw))[r.headers[REQUEST_ID_HEADER]]
    assert rec.status == 400 and rec.model == "" and rec.prompt_text == ""


async def test_gate_swap_changes_the_fingerprint_of_new_requests(gw) -> None:
    old = gw.core.engine._gate
    gw.core.set_gate(random_gate(len(gw.core.codec.tokenizer), version="gate-v9", seed=3))
    try:
        body = (await post(gw, "/v1/completions", completion(max_tokens=3))).json()
        assert body["system_fingerprint"] == "gate-v9"
        assert 'ensemble_gate_info{version="gate-v9"} 1.0' in (await gw.client.get("/metrics")).text
    finally:
        gw.core.set_gate(old)


async def test_a_stream_read_only_in_part_is_logged_exactly_once(gw) -> None:
    # httpx's ASGI transport buffers the whole body, so this is not a disconnect: the real one (TCP resets on
    # real sockets against the real service) is tests/integration/test_gateway_faults.py.
    async with gw.client.stream("POST", "/v1/completions", json=completion(max_tokens=50, stream=True)) as r:
        rid = r.headers[REQUEST_ID_HEADER]
        async for _ in r.aiter_raw():
            break
    rows = [rec for rec in (await records(gw)).values() if rec.request_id == rid]
    assert len(rows) == 1 and rows[0].complete


async def test_a_started_stream_is_on_record_before_it_ends(gw) -> None:
    """A provisional row is written when generation starts, so a hard kill mid-stream still leaves a record."""
    from starlette.requests import Request

    body = json.dumps(completion(max_tokens=5, stream=True)).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    resp = await gw.core.handle(Request(scope, receive), "completions")
    rid = resp.headers[REQUEST_ID_HEADER]
    provisional = (await records(gw))[rid]
    assert provisional.complete is False and provisional.status == 0 and "incomplete" in provisional.error
    chunks = [c async for c in resp.body_iterator]
    await resp.on_close()
    final = (await records(gw))[rid]
    assert final.complete is True and final.status == 200 and len(final.output_ids) == 5
    assert chunks[-1] == "data: [DONE]\n\n"


async def test_feedback_needs_a_logged_request(gw) -> None:
    rid = (await post(gw, "/v1/completions", completion(max_tokens=2))).json()["id"]
    ok = await gw.client.post("/v1/feedback", json={"request_id": rid, "rating": 1, "corrected_text": "better"})
    assert ok.status_code == 200 and ok.json()["request_id"] == rid
    missing = await gw.client.post("/v1/feedback", json={"request_id": "cmpl-nope", "rating": 1})
    assert missing.status_code == 404
    bad = await gw.client.post("/v1/feedback", json={"request_id": rid, "rating": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"


async def test_openai_client_works_unchanged(gw) -> None:
    import openai

    http = httpx.AsyncClient(transport=gw.transport, base_url="http://gw")
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="sk-test", http_client=http)
    c = await client.completions.create(model="ensemble", prompt="Hello", max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True, "return_routing": True})
    assert c.usage.completion_tokens == 5 and c.system_fingerprint == "gate-test"
    assert len(c.choices[0].model_extra["routing"]["tokens"]) == 5
    msg = await client.chat.completions.create(model="prose", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, extra_body={"ignore_eos": True})
    assert msg.choices[0].message.role == "assistant" and msg.usage.completion_tokens == 4
    stream = await client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, stream=True, extra_body={"ignore_eos": True})
    parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
    assert "".join(parts) is not None and len(parts) >= 2
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="ensemble", prompt="x", n=2)
    assert info.value.body["param"] == "n"
    await http.aclose()


async def test_metrics_expose_counters_histograms_and_expert_share(gw) -> None:
    text = (await gw.client.get("/metrics")).text
    for name in ("ensemble_requests_total", "ensemble_completion_tokens_total", "ensemble_expert_tokens_total",
                 "ensemble_expert_token_share", "ensemble_gate_entropy_nats_bucket",
                 "ensemble_time_to_first_token_seconds_bucket", "ensemble_inter_token_latency_seconds_bucket"):
        assert name in text, name


async def test_every_generation_request_was_logged_exactly_once(gw) -> None:
    logged = await records(gw)
    ids = [r.headers.get(REQUEST_ID_HEADER) or (r.json().get("id") if r.status_code == 200 else None) for r in gw.sent]
    served = [i for i in ids if i]
    assert len(served) == len(set(served)) and set(served) <= set(logged)
    assert len(logged) >= len(gw.sent)   # + streamed/disconnected ones made outside `post`
    health = (await gw.client.get("/health")).json()
    assert health["status"] == "ok" and health["in_flight"] == 0


async def test_openapi_declares_every_body_response_and_error(gw) -> None:
    """/openapi.json is true: request bodies, 200 bodies (JSON, and the stream's events), the error body."""
    doc = (await gw.client.get("/openapi.json")).json()
    schemas, paths = doc["components"]["schemas"], doc["paths"]

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(path: str, method: str = "post") -> dict:
        return paths[path][method]["responses"]["200"]["content"]

    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
              "/v1/feedback": "FeedbackRequest"}
    for path, item in paths.items():
        for method, op in item.items():
            if method == "post":
                body = op["requestBody"]
                assert body["required"] and body["content"]["application/json"]["schema"] == ref(bodies[path])
            assert "422" not in op["responses"], f"{method} {path}: invalid input is a 400 here"
            for status, response in op["responses"].items():
                if status[0] in "45" and path != "/health":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == ref("ErrorResponse"), (path, status)
    assert {m for item in paths.values() for m in item} == {"get", "post"} and set(bodies) < set(paths)
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert set(paths[path]["post"]["responses"]) == {"200", "400", "404", "413", "429", "500", "503"}
    assert ok("/v1/completions")["application/json"]["schema"] == ref("CompletionResponse")
    assert ok("/v1/chat/completions")["application/json"]["schema"] == ref("ChatCompletionResponse")
    for path, chunk in [("/v1/completions", "CompletionResponse"),
                        ("/v1/chat/completions", "ChatCompletionChunk")]:
        done, data = ok(path)["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert done == {"const": "[DONE]", "description": "the last event"}
        assert data["contentMediaType"] == "application/json"
        assert data["contentSchema"]["anyOf"] == [ref(chunk), ref("ErrorResponse")]
    assert ok("/v1/feedback")["application/json"]["schema"] == ref("FeedbackResponse")
    assert ok("/v1/models", "get")["application/json"]["schema"] == ref("ModelList")
    assert ok("/v1/models/{model_id}", "get")["application/json"]["schema"] == ref("ModelCard")
    not_found = paths["/v1/models/{model_id}"]["get"]["responses"]["404"]["content"]["application/json"]
    assert not_found["schema"] == ref("ErrorResponse")
    for status in ("200", "503"):
        health = paths["/health"]["get"]["responses"][status]["content"]["application/json"]["schema"]
        assert health == ref("HealthResponse")
    assert ok("/metrics", "get") == {"text/plain": {"schema": {"type": "string"}}}
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(schemas), f"dangling references: {refs - set(schemas)}"


async def test_openapi_states_this_deployments_models_and_limits(gw) -> None:
    """Generated requests then name served models, fit the context and stay in the vocabulary."""
    schemas = (await gw.client.get("/openapi.json")).json()["components"]["schemas"]
    engine = gw.core.engine
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert props["model"]["enum"] == ["ensemble", *EXPERT_NAMES]
        assert props["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
        assert props["experts_per_token"]["anyOf"][0]["maximum"] == len(EXPERT_NAMES)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[1]["items"]["maximum"] == prompt[3]["items"]["items"]["maximum"] == engine.vocab_size - 1
    examples = {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = (await gw.client.get("/openapi.json")).json()["paths"][path]["post"]
        examples |= {f"{path} {k}": v["value"] for k, v in op["requestBody"]["content"]["application/json"]
                     ["examples"].items()}
    assert any(e.get("stream") for e in examples.values())
    for name, body in examples.items():         # the documented examples work as written
        r = await post(gw, name.split()[0], body)
        assert r.status_code == 200, (name, r.text)
