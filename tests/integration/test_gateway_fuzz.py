"""Schemathesis fuzzes the real service (Serve + vLLM experts) from the /openapi.json it publishes.

The same run as tests/unit/test_api_fuzz.py (coverage cases, the documented examples, then FUZZ_EXAMPLES
valid and schema-breaking Hypothesis cases per operation): no 5xx, every answer as documented. Afterwards
every request that reached the gateway's logic is in the traffic log with the status it got, the engines
still answer every model, and /health is ok. `make fuzz` runs it large (FUZZ_EXAMPLES=1000).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis

from orchestrator.service import REQUEST_ID_HEADER
from tests.unit.test_api_fuzz import run_fuzz

pytestmark = pytest.mark.integration
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))


def test_fuzzing_the_service_finds_no_server_error_and_harms_nothing(live_gateway) -> None:
    base = live_gateway.base_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    answered: dict[str, tuple[int, bool]] = {}      # request id -> (HTTP status, streamed)

    def call(case):
        response = case.call(base_url=base, timeout=300)
        for rid in response.headers.get(REQUEST_ID_HEADER, []):
            content_type = " ".join(response.headers.get("content-type", []))
            answered[rid] = (response.status_code, content_type.startswith("text/event-stream"))
        return response

    sent = run_fuzz(schema, FUZZ_EXAMPLES, call)
    print(f"fuzzed the live gateway: {sum(sent.values())} cases {sent}; {len(answered)} reached the logic")
    assert sum(status == 200 for status, _ in answered.values()) >= 5, "the fuzzer should reach the engines"

    records = live_gateway.records()
    missing = set(answered) - set(records)
    assert not missing, f"{len(missing)} requests are not in the traffic log, e.g. {sorted(missing)[:3]}"
    for rid, (status, streamed) in answered.items():
        rec = records[rid]
        assert rec.complete, rid
        # A stream the fuzzer stopped reading after its first events is logged as a disconnect (499).
        assert rec.status == status or (streamed and rec.status == 499), (rid, status, rec.status, rec.error)

    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and health["in_flight"] == 0, health
    for model in health["models"]:
        r = httpx.post(f"{base}/v1/completions", timeout=120,
                       json={"model": model, "prompt": "def add(a, b):", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, (model, r.text)
