"""The traffic log against the real application: every request exactly once, with the tokens the client got;
failures logged too; no secrets; stopping a gateway mid-load loses and duplicates nothing."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from orchestrator.service import REQUEST_ID_HEADER

pytestmark = pytest.mark.integration
SECRET = "sk-live-secret-123"


def call(base_url: str, path: str, body: dict) -> dict:
    """-> {"id", "text", "tokens", "logprobs", "fingerprint", "status"} as the client saw it."""
    headers = {"Authorization": f"Bearer {SECRET}"}
    if not body.get("stream"):
        r = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=120)
        if r.status_code != 200:
            return {"id": r.headers[REQUEST_ID_HEADER], "status": r.status_code}
        b = r.json()
        ch = b["choices"][0]
        text = ch["text"] if "text" in ch else ch["message"]["content"]
        lps = ch["logprobs"] and (ch["logprobs"].get("token_logprobs") or [c["logprob"] for c in ch["logprobs"]["content"]])
        return {"id": b["id"], "text": text, "tokens": b["usage"]["completion_tokens"], "logprobs": lps,
                "fingerprint": b["system_fingerprint"], "status": 200}
    with httpx.stream("POST", f"{base_url}{path}", json=body, headers=headers, timeout=120) as r:
        frames = [f for f in "".join(r.iter_text()).split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    events = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    chunks = [e["choices"][0] for e in events if e["choices"]]
    text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in chunks)
    return {"id": events[0]["id"], "text": text, "tokens": events[-1]["usage"]["completion_tokens"],
            "fingerprint": events[0]["system_fingerprint"], "status": 200,
            "finish": [c["finish_reason"] for c in chunks if c["finish_reason"]]}


def test_every_request_is_logged_once_with_the_tokens_of_its_response(live_gateway) -> None:
    base = live_gateway.base_url
    usage = {"stream_options": {"include_usage": True}}
    bodies = [
        ("/v1/completions", {"model": "ensemble", "prompt": "def f(x):", "max_tokens": 8, "logprobs": 2}),
        ("/v1/completions", {"model": "ensemble", "prompt": "import", "max_tokens": 8, "stream": True, **usage}),
        ("/v1/completions", {"model": "math", "prompt": "2 + 2 =", "max_tokens": 6, "temperature": 0}),
        ("/v1/completions", {"model": "ensemble", "prompt": "a", "max_tokens": 12, "stop": ["e", "\n"]}),
        ("/v1/chat/completions", {"model": "ensemble", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 6, "logprobs": True}),
        ("/v1/chat/completions", {"model": "prose", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 6, "stream": True, **usage}),
        ("/v1/completions", {"model": "ensemble", "prompt": "x", "n": 4}),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    ]
    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda pb: call(base, *pb), bodies))
    logged = live_gateway.records()
    assert len({s["id"] for s in seen}) == len(seen)
    for s, (path, body) in zip(seen, bodies):
        rec = logged[s["id"]]
        assert rec.status == s["status"] and rec.endpoint == path.removeprefix("/v1/").replace("/", ".")
        assert SECRET not in json.dumps(rec.params)
        if s["status"] != 200:
            assert rec.error and rec.output_ids == ()
            continue
        # (the store keeps a NUL character as U+FFFD: orchestrator/store/records.py)
        assert rec.output_text == s["text"].replace("\x00", "\ufffd") and len(rec.output_ids) == s["tokens"]
        assert rec.gate_version == s["fingerprint"] and rec.model == body["model"]
        assert len(rec.routing_experts) == len(rec.output_ids) == len(rec.logprobs)
        if s.get("logprobs"):
            assert list(rec.logprobs) == pytest.approx(s["logprobs"])
    raw = b"".join(p.read_bytes() for p in live_gateway.db.parent.glob(live_gateway.db.name + "*"))
    assert SECRET.encode() not in raw


def test_stopping_a_gateway_mid_load_loses_and_duplicates_nothing(live_gateway, tmp_path) -> None:
    """A second gateway app over the same experts; `serve.delete` while 6 streams run (what Ctrl-C does)."""
    from ray import serve

    from orchestrator.gateway import Gateway
    from orchestrator.traffic_log import iter_records

    names = [e.name for e in live_gateway.config.experts]
    handles = {n: serve.get_deployment_handle(f"expert-{n}", live_gateway.app_name) for n in names}
    cfg = live_gateway.config.model_copy(update={"traffic_log": live_gateway.config.traffic_log.model_copy(
        update={"url": f"sqlite:///{tmp_path / 'drain.db'}"})})
    serve.run(Gateway.options(**cfg.gateway_options()).bind(handles, cfg.gateway_settings()),
              name="drain-test", route_prefix="/drain")
    base = f"{live_gateway.base_url}/drain"
    body = {"model": "ensemble", "prompt": "for i in", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    started = threading.Semaphore(0)

    def one(_):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            rid, frames = r.headers[REQUEST_ID_HEADER], []
            for chunk in r.iter_text():
                if not frames:
                    started.release()
                frames.append(chunk)
        return rid, "".join(frames)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        for _ in futures:
            started.acquire(timeout=120)
        serve.delete("drain-test")          # graceful: drains in-flight requests, then __del__ flushes the log
        results = [f.result() for f in futures]
    rows = list(iter_records(tmp_path / "drain.db"))
    assert sorted(r.request_id for r in rows) == sorted(rid for rid, _ in results)   # all, each once
    for rec in rows:
        assert rec.finish_reason == "length" and len(rec.output_ids) == 40 and rec.status == 200
    assert all(raw.endswith("data: [DONE]\n\n") for _, raw in results)
