"""Schemathesis fuzzes the in-process gateway (real engine, deterministic experts) from its own /openapi.json.

Every generated request must get a documented status whose body matches the documented schema, never a 5xx:
schemathesis' coverage cases (boundary values, and each constraint broken in turn), then `FUZZ_EXAMPLES`
Hypothesis examples per operation of valid and of schema-breaking requests; text/event-stream events are
checked against the chunk model. A schema-breaking request must be refused (4xx), so the schema is no
stricter than the gateway. Then every generation request is in the traffic log, the engine still answers a
plain completion and /health is ok. `run_fuzz` is shared with tests/integration/test_gateway_fuzz.py.

(The schemathesis pytest plugin is not used: its fixture-based loader breaks on pytest 9's node ids, and an
import-time schema would start an engine at collection.)
"""

from __future__ import annotations

import os
from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from orchestrator.gateway import build_fastapi
from orchestrator.metrics import GatewayMetrics
from orchestrator.service import REQUEST_ID_HEADER, GatewayCore, GatewaySettings
from orchestrator.store import TrafficLog, iter_records
from orchestrator.stream import TextCodec
from tests.gateway_fakes import byte_level_tokenizer, make_engine, random_gate

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def run_fuzz(schema, examples: int, call: Callable) -> dict[str, int]:
    """For every operation of `schema`: its documented examples, schemathesis' coverage cases, then `examples`
    Hypothesis cases per mode (seeded: the same cases every run). Each case is sent with `call(case)` and its
    response validated with CHECKS; the first failure raises (shrunk). Returns the cases sent per
    operation."""
    sent: dict[str, int] = {}

    def check(case) -> None:
        case.validate_response(call(case), checks=CHECKS)
        sent[case.operation.label] = sent.get(case.operation.label, 0) + 1

    def run(strategy, examples: int) -> None:
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz_one(case) -> None:
            check(case)

        fuzz_one()

    for result in schema.get_all_operations():
        operation = result.ok()
        for example in operation.get_strategies_from_examples():
            run(example, 1)
        for case in schema.iter_coverage_cases(operation, generation_modes=MODES,
                                               generation_config=schema.config.generation):
            check(case)
        # Only a body can be broken (the GETs take at most a free-form string): valid requests for the others.
        for mode in MODES if operation.get_request_payload_content_types() else MODES[:1]:
            run(operation.as_strategy(generation_mode=mode), examples)
    return sent


class LazyGateway:
    """The gateway as an ASGI app that builds its engine and traffic log at lifespan startup, so that they
    live in the event loop schemathesis serves the app from (a thread of its own); closed at shutdown."""

    def __init__(self, db) -> None:
        self.db, self.core, self.app = db, None, None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                tok = byte_level_tokenizer()
                engine = make_engine(len(tok), gate=random_gate(len(tok)), max_model_len=128)
                await engine.start()
                self.core = GatewayCore(engine, TextCodec(tok), TrafficLog(self.db), GatewayMetrics(),
                                        GatewaySettings(str(self.db), max_request_bytes=100_000))
                self.app = build_fastapi(self.core)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.core.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def test_fuzzing_from_the_schema_finds_no_server_error_and_no_undocumented_answer(tmp_path) -> None:
    gateway = LazyGateway(tmp_path / "traffic.db")
    schema = schemathesis.openapi.from_asgi("/openapi.json", gateway)
    answered: dict[str, tuple[int, bool]] = {}      # request id -> (HTTP status, streamed)

    def call(case):
        response = case.call()
        for rid in response.headers.get(REQUEST_ID_HEADER, []):
            content_type = " ".join(response.headers.get("content-type", []))
            answered[rid] = (response.status_code, content_type.startswith("text/event-stream"))
        return response

    sent = run_fuzz(schema, FUZZ_EXAMPLES, call)
    print(f"fuzzed the in-process gateway: {sum(sent.values())} cases {sent}; "
          f"{len(answered)} reached the logic")
    served = [streamed for status, streamed in answered.values() if status == 200]
    assert len(served) >= 10 and any(served), "the fuzzer should reach the engine, streams included"

    core = gateway.core
    assert core.log.flush() and core.log.healthy
    records = {r.request_id: r for r in iter_records(gateway.db)}
    for rid, (status, streamed) in answered.items():
        assert rid in records and records[rid].complete, rid
        # A stream the fuzzer stopped reading after its first events is logged as a disconnect (499).
        assert records[rid].status == status or (streamed and records[rid].status == 499), (rid, status)
    ok = case_call(schema, "POST /v1/completions", {"model": "ensemble", "prompt": "def add(a, b):",
                                                    "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    health = case_call(schema, "GET /health", None)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["in_flight"] == 0


def case_call(schema, label: str, body):
    """One request to the app in schemathesis' event loop (where its engine lives)."""
    operation = schema.find_operation_by_label(label)
    return (operation.Case(body=body) if body is not None else operation.Case()).call()
