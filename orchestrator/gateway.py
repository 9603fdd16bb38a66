"""The Serve ingress deployment: FastAPI routes over one GatewayCore (engine + text layer + traffic log).

Routes: POST /v1/completions, /v1/chat/completions, /v1/feedback; GET /v1/models, /health, /metrics.
Serve's `user_config` is a GatewayUserConfig; changing it calls `reconfigure` (live gate swap, or drain).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.thread_priority import raise_relay_thread
from orchestrator import api
from orchestrator.api import OpenAIError
from orchestrator.metrics import GatewayMetrics
from orchestrator.ray_metrics import RayMetricsBridge
from orchestrator.service import GatewayCore, GatewaySettings
from orchestrator.store import TrafficLog, registry_location, resolve_store_url
from orchestrator.store.replica_status import report_replica
from orchestrator.stream import TextCodec

logger = logging.getLogger(__name__)


class GateSource(BaseModel):
    """Which gate to serve: a registry directory (its live version, or `version`) or one checkpoint file.

    Retraining promotes a version and redeploys with a new `version` here: Serve sees a changed user_config
    and calls Gateway.reconfigure on every replica, with no restart; in-flight requests keep their gate.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    version: str | None = None


class GatewayUserConfig(BaseModel):
    """The gateway deployment's Serve `user_config`. Serve calls Gateway.reconfigure on every replica
    whenever it changes (`serve deploy`/`serve.run` with a new value), without restarting anything."""

    model_config = ConfigDict(extra="forbid")

    gate: GateSource | None = None     # None: no trained gate, the ensemble mixes all experts uniformly
    # True before a planned stop: refuse new requests and return once in-flight ones are done, so the experts
    # (stopped in parallel with the gateway by `serve.delete`) are not pulled from under running streams.
    draining: bool = False


def load_gate(source: GateSource, expert_names: list[str], tokenizer_fingerprint: str | None,
              top_k: int, mix_space: str | None):
    """Read and check a gate checkpoint (blocking: torch.load, or a database read) -> GateRuntime."""
    from gating.checkpoint import load_gate_checkpoint
    from gating.runtime import GateRuntime

    # A registry in a database follows ENSEMBLE_STORE_URL in this replica's environment, as the store does.
    ckpt = load_gate_checkpoint(registry_location(source.path), source.version)
    ckpt.check_matches(expert_names, tokenizer_fingerprint)
    return GateRuntime.from_checkpoint(ckpt, top_k, mix_space)


def build_fastapi(core: GatewayCore) -> FastAPI:
    """The routes over `core`. Handlers take the raw Request: GatewayCore reads the body itself (size limit
    before parsing, strict JSON, OpenAI error body, and every rejected request logged with its id). So the
    request bodies are declared in the OpenAPI document (openapi_extra + components), not as FastAPI Body
    parameters, whose validation would run before all that and answer 422 in FastAPI's own format."""
    app = FastAPI(title="ensemble gateway", version="1", description=_DESCRIPTION)
    # API keys (orchestrator/keys): once one exists, /v1/* needs one (401), /v1/admin/* an admin one (403).
    keys = core.keys
    user = [Depends(keys.user)] if keys is not None else []

    @app.post("/v1/completions", operation_id="createCompletion", dependencies=user, tags=["OpenAI"],
              summary="Complete a prompt (text or token ids), optionally as a stream",
              response_model=api.CompletionResponse,
              openapi_extra=_json_body(api.CompletionRequest, **_COMPLETIONS),
              responses=_generation_responses("CompletionResponse"))
    async def completions(request: Request) -> Response:
        return await core.handle(request, "completions")

    @app.post("/v1/chat/completions", operation_id="createChatCompletion", dependencies=user, tags=["OpenAI"],
              summary="Answer a conversation, optionally as a stream",
              response_model=api.ChatCompletionResponse,
              openapi_extra=_json_body(api.ChatCompletionRequest, **_CHATS),
              responses=_generation_responses("ChatCompletionChunk"))
    async def chat_completions(request: Request) -> Response:
        return await core.handle(request, "chat.completions")

    @app.post("/v1/feedback", operation_id="createFeedback", dependencies=user, tags=["ensemble"],
              summary="Rate a logged response (retraining uses the good ones)",
              response_model=api.FeedbackResponse,
              openapi_extra=_json_body(api.FeedbackRequest, rate=_FEEDBACK),
              responses={**_errors(400, 413), 404: _error("no logged request with this request_id")})
    async def feedback(request: Request) -> Response:
        return await core.feedback(request)

    @app.get("/v1/models", operation_id="listModels", dependencies=user, tags=["OpenAI"], response_model=api.ModelList)
    async def models() -> api.ModelList:
        return _model_list(core)

    @app.get("/v1/models/{model_id}", operation_id="retrieveModel", dependencies=user, tags=["OpenAI"],
             response_model=api.ModelCard, responses={404: _error("no such model")})
    async def model(model_id: str) -> api.ModelCard:
        for card in _model_list(core).data:
            if card.id == model_id:
                return card
        raise OpenAIError(f"The model '{model_id}' does not exist", status=404, param="model",
                          code="model_not_found")

    @app.get("/health", operation_id="health", tags=["operations"], response_model=api.HealthResponse,
             responses={503: {"model": api.HealthResponse,
                              "description": "cannot serve: draining, log writer stopped, or no expert up"}})
    async def health() -> Response:
        status, body = core.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", operation_id="metrics", tags=["operations"], response_class=PlainTextResponse,
             dependencies=[Depends(keys.metrics)] if keys is not None else [],
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        payload, content_type = core.metrics.render()
        return Response(payload, media_type=content_type)

    if keys is not None:
        from orchestrator.keys.routes import admin_router

        app.include_router(admin_router(keys))

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = OpenAIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        err = OpenAIError(str(exc.errors()[0].get("msg", "invalid request")))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        # Starlette still logs the traceback; the client gets the documented body, not plain text.
        err = OpenAIError(f"internal error ({type(exc).__name__})", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    generated = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _complete_openapi(generated(), core)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _model_list(core: GatewayCore) -> api.ModelList:
    created = int(core.started)
    ctx = core.engine.max_model_len
    return api.ModelList(data=[api.ModelCard(id=m, created=created, max_model_len=ctx) for m in core.models])


# ---- the OpenAPI document (/openapi.json) -----------------------------------------------------------------

_DESCRIPTION = """OpenAI-compatible API over a gated ensemble of experts.

Errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx status (5xx: the service's fault, with
Retry-After where retrying helps). Streams (`stream: true`) are Server-Sent Events: one JSON chunk per
`data:` line, then `data: [DONE]`; an error after the stream started arrives as one ErrorResponse event."""
_REF = "#/components/schemas/{model}"
_REQUEST_ID = {"x-ensemble-request-id": {"schema": {"type": "string"},
                                        "description": "the request's id in the traffic log (= body id)"}}
_DEGRADED = {"x-ensemble-degraded-tokens": {
    "schema": {"type": "string"}, "required": False,
    "description": "present when tokens were routed around an expert that could not answer: how many"}}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait, then retry"}}
# Request examples (also what a fuzzer sends first): one of each kind of answer, streams included.
_COMPLETIONS = {
    "routed": {"model": "ensemble", "prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0,
               "return_routing": True},
    "stream": {"model": "ensemble", "prompt": "The capital of France is", "max_tokens": 16, "stream": True,
               "stream_options": {"include_usage": True}, "logprobs": 2},
    "score_prompt": {"model": "ensemble", "prompt": "The quick brown fox", "echo": True, "max_tokens": 0,
                     "logprobs": 5},
}
_CHATS = {
    "logprobs": {"model": "ensemble", "messages": [{"role": "user", "content": "Explain recursion."}],
                 "max_tokens": 24, "logprobs": True, "top_logprobs": 2, "seed": 7},
    "stream": {"model": "ensemble", "stream": True, "max_tokens": 32, "return_routing": True,
               "messages": [{"role": "system", "content": "Answer in JSON."},
                            {"role": "user", "content": [{"type": "text", "text": "Describe a book."}]}]},
}
_FEEDBACK = {"request_id": "chatcmpl-0123456789abcdef", "rating": 1, "corrected_text": "A better answer."}
_ERROR_TEXT = {
    400: "invalid parameter (`param` names it) or a body that is not a JSON object",
    404: "unknown model",
    413: "request body larger than the gateway's max_request_bytes",
    429: "the experts are at capacity",
    500: "a bug in the service (the message carries the request id)",
    503: "experts unavailable, or the service is shutting down",
}


def _error(description: str, headers: dict | None = None) -> dict:
    response = {"model": api.ErrorResponse, "description": description}
    return {**response, "headers": headers} if headers else response


def _errors(*statuses: int, headers: dict | None = None) -> dict:
    return {s: _error(_ERROR_TEXT[s], {**(headers or {}), **(_RETRY_AFTER if s in (429, 503) else {})})
            for s in statuses}


def _json_body(model: type[BaseModel], **examples: dict) -> dict:
    content = {"schema": {"$ref": _REF.format(model=model.__name__)},
               "examples": {name: {"value": value} for name, value in examples.items()}}
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def _sse_event(chunk: str) -> dict:
    """One Server-Sent Event of a stream (OpenAPI 3.1 has no stream item keyword: `schema` is one event)."""
    payload = {"anyOf": [{"$ref": _REF.format(model=chunk)}, {"$ref": _REF.format(model="ErrorResponse")}]}
    data = {"anyOf": [{"const": "[DONE]", "description": "the last event"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data},
            "description": f"`data: <{chunk} JSON>` events, then `data: [DONE]`"}


def _generation_responses(chunk: str) -> dict:
    ok = {"description": "the completion; with stream=true, a text/event-stream of chunks",
          "headers": {**_REQUEST_ID, **_DEGRADED}, "content": {"text/event-stream": {"schema": _sse_event(chunk)}}}
    return {200: ok, **_errors(400, 404, 413, 429, 500, 503, headers=_REQUEST_ID)}


def _complete_openapi(doc: dict, core: GatewayCore) -> None:
    """Add what FastAPI cannot see (request bodies, the stream chunk) and this deployment's limits (models,
    context length, vocabulary, experts), so generated requests reach the engine; drop FastAPI's 422s,
    which this gateway never sends (invalid input is a 400)."""
    _, defs = models_json_schema(
        [(api.CompletionRequest, "validation"), (api.ChatCompletionRequest, "validation"),
         (api.FeedbackRequest, "validation"), (api.ChatCompletionChunk, "serialization")], ref_template=_REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in copy.deepcopy(defs["$defs"]).items():
        # FastAPI's copy of a response model differs only in leaving out defaults of always-sent fields
        if _without_defaults(schemas.setdefault(name, schema)) != _without_defaults(schema):
            raise RuntimeError(f"two different OpenAPI schemas named {name}")
    engine, ctx = core.engine, core.engine.max_model_len
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"]["enum"] = core.models
        for budget in ("max_tokens", "max_completion_tokens"):
            if budget in props:
                props[budget]["anyOf"][0]["maximum"] = ctx - 1       # the prompt takes at least one token
        props["experts_per_token"]["anyOf"][0]["maximum"] = len(engine.expert_names)
    _, token_ids, _, one_token_list = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    token_ids["items"]["maximum"] = one_token_list["items"]["items"]["maximum"] = engine.vocab_size - 1
    for path in doc["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
            # A key is needed only once an active key exists: an open service (no keys) answers without one.
            # OpenAPI says "optional" with an empty requirement next to the bearer one.
            if operation.get("security") and {} not in operation["security"]:
                operation["security"].append({})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _without_defaults(schema: object) -> object:
    if isinstance(schema, dict):
        return {k: _without_defaults(v) for k, v in schema.items() if k != "default"}
    return [_without_defaults(v) for v in schema] if isinstance(schema, list) else schema


@serve.deployment(
    name="gateway",
    # The gateway mostly awaits experts; it needs little CPU but many concurrent streams.
    max_ongoing_requests=256,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=60.0,
    health_check_period_s=10.0,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress()
class Gateway:
    """One replica: an EnsembleEngine over the expert handles, its text layer, traffic log and metrics."""

    async def __init__(self, experts: dict[str, Any], settings: GatewaySettings) -> None:
        from experts.client import ServeExpertClient
        from orchestrator.engine import EnsembleEngine

        clients = {name: ServeExpertClient(handle, name, call_timeout_s=settings.expert_timeout_s)
                   for name, handle in experts.items()}
        engine = EnsembleEngine(clients, None, top_k=settings.top_k, mix_space=settings.mix_space or "logits",
                                logprobs_k=settings.logprobs_k, probe_timeout_s=settings.expert_timeout_s)
        await engine.start()
        codec = await asyncio.to_thread(TextCodec.from_pretrained, engine.infos[0].model_path)
        # One store for every replica (ENSEMBLE_STORE_URL in this replica's environment wins over the config).
        log = await asyncio.to_thread(TrafficLog, resolve_store_url(settings.store_url),
                                      max_buffer_rows=settings.store_buffer_rows)
        metrics = GatewayMetrics()
        metrics.attach_store(log)
        # The same metrics through Ray's pipeline: one Prometheus sees every replica on every node.
        self._ray_metrics = RayMetricsBridge(metrics.registry, serve.get_replica_context().replica_id.unique_id)
        self._ray_metrics.start()
        from orchestrator.keys import KeyGuard

        # Keys live in the same database as the traffic log; each replica reloads its view every ~2 s.
        keys = await asyncio.to_thread(KeyGuard.open, resolve_store_url(settings.store_url),
                                       metrics_public=settings.metrics_public, registry=metrics.registry)
        self.core = GatewayCore(engine, codec, log, metrics, settings, keys)
        self._gate_source: GateSource | None = None
        relay = raise_relay_thread()                    # this loop relays every token (experts/thread_priority.py)
        logger.info("gateway ready: models %s, traffic store %s; %s; event loop priority %s", self.core.models,
                    log.url, keys.describe(), relay)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self.core)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this after __init__ and whenever the deployment's user_config changes."""
        try:
            config = GatewayUserConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"invalid gateway user_config {user_config!r}: {exc}") from None
        if config.gate == self._gate_source:
            self.core.gate_error = None         # asked for what is live (e.g. after a failed swap)
        elif config.gate is not None:
            try:
                await self._swap_gate(config.gate)
            except Exception as exc:
                if self._gate_source is None:
                    raise               # at startup there is no gate to fall back on: fail the deployment
                # Raising here would make Serve replace the replica, which would fail the same way: keep
                # serving the live gate and say so in /health (callers check gate_version after a swap).
                self.core.gate_error = f"gate {config.gate.version or config.gate.path} not loaded: {exc}"
                logger.error(self.core.gate_error)
        if config.draining:
            await self.core.drain()
        else:
            self.core.resume()
        # What this replica serves, where a swapping job on any node can check it (deploy/retrain_job.py).
        try:
            await asyncio.to_thread(report_replica, resolve_store_url(self.core.settings.store_url),
                                    serve.get_replica_context().replica_id.unique_id,
                                    self.core.engine.gate_version, self.core.gate_error)
        except Exception:
            logger.exception("could not record this replica's gate version in the store")

    async def _swap_gate(self, source: GateSource) -> None:
        engine, t0 = self.core.engine, time.perf_counter()
        gate = await asyncio.to_thread(load_gate, source, engine.expert_names,
                                       engine.infos[0].tokenizer_fingerprint, engine.top_k, self.core.settings.mix_space)
        self.core.set_gate(gate)
        self._gate_source, self.core.gate_error = source, None
        logger.info("gate %s live after %.2f s (from %s)", gate.version, time.perf_counter() - t0, source.path)

    async def gate_version(self, replica: str | None = None) -> str:
        """For handle callers (retraining, tests): the version new requests are served with. `replica=` pins
        the call to one replica (deploy/replicas.py)."""
        return self.core.engine.gate_version

    async def flush_log(self, replica: str | None = None) -> bool:
        """For handle callers (tests, retraining): wait until every finished request is committed."""
        return await asyncio.to_thread(self.core.log.flush)

    def check_health(self) -> None:
        if not self.core.log.healthy:
            raise RuntimeError(f"traffic log writer for {self.core.log.path} died")

    async def __del__(self) -> None:
        bridge = getattr(self, "_ray_metrics", None)
        if bridge is not None:
            await bridge.stop()
        core = getattr(self, "core", None)          # absent when the replica is stopped mid-__init__
        if core is not None:
            await core.aclose()
