"""The Serve ingress deployment: FastAPI routes over one GatewayCore (engine + text layer + traffic log).

Routes: POST /v1/completions, /v1/chat/completions, /v1/feedback; GET /v1/models, /health, /metrics.
Serve's `user_config` is a GatewayUserConfig; changing it calls `reconfigure` (live gate swap, or drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import api
from orchestrator.api import OpenAIError
from orchestrator.metrics import GatewayMetrics
from orchestrator.service import GatewayCore, GatewaySettings
from orchestrator.stream import TextCodec
from orchestrator.traffic_log import TrafficLog

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
    """Read and check a gate checkpoint (blocking: torch.load) -> GateRuntime."""
    from gating.checkpoint import GateRegistry, load_checkpoint, resolve_gate_path
    from gating.runtime import GateRuntime

    path = Path(source.path)
    file = GateRegistry(path).path_of(source.version) if source.version and path.is_dir() else resolve_gate_path(path)
    ckpt = load_checkpoint(file)
    if source.version and ckpt.version != source.version:
        raise ValueError(f"{file} holds gate {ckpt.version}, not the requested {source.version}")
    ckpt.check_matches(expert_names, tokenizer_fingerprint)
    return GateRuntime.from_checkpoint(ckpt, top_k, mix_space)


def build_fastapi(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="ensemble gateway", description="OpenAI-compatible API over a gated ensemble of experts")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await core.handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await core.handle(request, "chat.completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        return await core.feedback(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return _model_list(core).model_dump()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        for card in _model_list(core).data:
            if card.id == model_id:
                return card.model_dump()
        raise OpenAIError(f"The model '{model_id}' does not exist", status=404, param="model",
                          code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        status, body = core.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = core.metrics.render()
        return Response(payload, media_type=content_type)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = OpenAIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        err = OpenAIError(str(exc.errors()[0].get("msg", "invalid request")))
        return JSONResponse(err.body(), status_code=400)

    return app


def _model_list(core: GatewayCore) -> api.ModelList:
    created = int(core.started)
    ctx = core.engine.max_model_len
    return api.ModelList(data=[api.ModelCard(id=m, created=created, max_model_len=ctx) for m in core.models])


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
                                logprobs_k=settings.logprobs_k)
        await engine.start()
        codec = await asyncio.to_thread(TextCodec.from_pretrained, engine.infos[0].model_path)
        log_path = settings.traffic_log_path.replace("{replica}", serve.get_replica_context().replica_tag)
        self.core = GatewayCore(engine, codec, TrafficLog(log_path), GatewayMetrics(), settings)
        self._gate_source: GateSource | None = None
        logger.info("gateway ready: models %s, traffic log %s", self.core.models, log_path)

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

    async def _swap_gate(self, source: GateSource) -> None:
        engine, t0 = self.core.engine, time.perf_counter()
        gate = await asyncio.to_thread(load_gate, source, engine.expert_names,
                                       engine.infos[0].tokenizer_fingerprint, engine.top_k, self.core.settings.mix_space)
        self.core.set_gate(gate)
        self._gate_source, self.core.gate_error = source, None
        logger.info("gate %s live after %.2f s (from %s)", gate.version, time.perf_counter() - t0, source.path)

    async def gate_version(self) -> str:
        """For handle callers (retraining, tests): the version new requests are served with."""
        return self.core.engine.gate_version

    async def flush_log(self) -> bool:
        """For handle callers (tests, retraining): wait until every finished request is committed."""
        return await asyncio.to_thread(self.core.log.flush)

    def check_health(self) -> None:
        if not self.core.log.healthy:
            raise RuntimeError(f"traffic log writer for {self.core.log.path} died")

    async def __del__(self) -> None:
        core = getattr(self, "core", None)          # absent when the replica is stopped mid-__init__
        if core is not None:
            await core.aclose()
