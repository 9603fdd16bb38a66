"""The gateway's request service, free of Serve: validate, run the engine, shape OpenAI responses, log, count.

Bad input never reaches the engine (OpenAI error body, 4xx); every request, failed or not, is logged exactly
once. orchestrator/gateway.py puts this behind FastAPI routes inside the Serve ingress deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from orchestrator import api, responses
from orchestrator.admission import Admission
from orchestrator.api import OpenAIError, read_json
from orchestrator.metrics import GatewayMetrics
from orchestrator.request_checks import RequestRejected, outside_vocabulary
from orchestrator.responses import ClosingStreamingResponse, plain_chunk, sse, sse_fast
from orchestrator.store import StoreError, TrafficLog, TrafficRecord
from orchestrator.stream import StopMatcher, TextCodec, TextDelta, stream_text
from orchestrator.types import AtCapacity, ExpertsUnavailable, GenerationParams, GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)
# Serve's proxy already sets its own x-request-id on every response; ours is the id in the body and the log.
REQUEST_ID_HEADER = "x-ensemble-request-id"
# Set on a (non-streamed) response when some of its tokens were routed around an expert that could not answer:
# the number of such tokens. A stream says it in usage.degraded_tokens and, with return_routing, per chunk.
DEGRADED_HEADER = "x-ensemble-degraded-tokens"
_INCOMPLETE = "incomplete: the gateway stopped before this request finished"


RETRY_AFTER_S = 1


def rejected(exc: RequestRejected, prompt_param: str = "prompt") -> OpenAIError:
    """A request the engine refuses (orchestrator/request_checks.py, or an expert refusing its input), as the
    4xx it is; the prompt is named by the field it came in (`prompt`, or `messages` for a chat)."""
    param = prompt_param if exc.param == "prompt" else exc.param
    return OpenAIError(exc.message, status=exc.status, param=param, code=exc.code)


def overloaded(exc: Exception) -> OpenAIError:
    """No expert can take the request now: 429 when they are full, 503 when they are down; both say when to
    retry. Never a 500: nothing is wrong with the request or the service's code."""
    if isinstance(exc, AtCapacity):
        return OpenAIError(f"the experts are at capacity: {exc}", status=429, type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    return OpenAIError(f"service temporarily unavailable: {exc}", status=503, type="server_error",
                       code="expert_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass(frozen=True)
class GatewaySettings:
    store_url: str                        # the traffic store every replica shares (ENSEMBLE_STORE_URL wins)
    store_buffer_rows: int = 100_000      # rows kept in memory while the store's database is unreachable
    top_k: int = 2
    mix_space: str | None = None       # None: each gate checkpoint's own space (the one it was trained for)
    logprobs_k: int = 20
    max_request_bytes: int = 1_000_000
    default_max_tokens: int = 16          # /v1/completions default, as in OpenAI's API
    drain_timeout_s: float = 30.0         # on shutdown, wait this long for in-flight requests
    # One call to an expert replica (a decode step of every sequence on it) that takes longer than this is
    # treated as a dead replica: its sessions are re-opened elsewhere or the expert is routed around.
    expert_timeout_s: float = 10.0
    # Admission: generations running at once on this replica; beyond that a request waits (up to
    # queue_timeout_s, at most max_queued of them), then gets a 429 with Retry-After.
    max_active: int = 48
    max_queued: int = 256
    queue_timeout_s: float = 30.0
    # /metrics without a key even once API keys exist (by default it then needs one, like /v1/*).
    metrics_public: bool = False

    @property
    def traffic_log_path(self) -> str:
        """The old name of `store_url` (tests/unit/test_deploy_config.py still reads it)."""
        return self.store_url


@dataclass
class _Trace:
    """Everything one request leaves in the traffic log; filled in as the request proceeds."""

    request_id: str
    endpoint: str
    created: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    model: str = ""
    params: dict = field(default_factory=dict)
    prompt_ids: tuple[int, ...] = ()
    prompt_text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    output_text: str = ""
    gate_version: str = ""
    ttft_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int = 200
    done: bool = False
    admitted: bool = False              # holds an admission slot, released when the request is finished
    api_key: Any = None                 # the caller's orchestrator.keys.ApiKey (None while the service is open)
    ticket: Any = None                  # its charge against the key's limits, settled when the request ends

    def record(self, complete: bool = True) -> TrafficRecord:
        ev = self.events
        error, status = (self.error, self.status) if complete else (_INCOMPLETE, 0)
        return TrafficRecord(
            self.request_id, self.created, self.endpoint, self.model, self.params, self.prompt_ids,
            self.prompt_text, tuple(e.token_id for e in ev), self.output_text,
            tuple(e.routing.experts for e in ev), tuple(e.routing.weights for e in ev),
            tuple(e.routing.entropy for e in ev), tuple(e.logprob for e in ev), self.gate_version,
            self.ttft_s, time.perf_counter() - self.t0, self.finish_reason, error, status, complete,
            degraded_tokens=tuple(i for i, e in enumerate(ev) if e.routing.degraded),
            key_name=self.api_key.name if self.api_key is not None else None)


@dataclass(frozen=True)
class _Prepared:
    """A validated request, in token ids, ready for the engine."""

    request: GenerationRequest
    prompt_text: str
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_routing: bool
    logprobs: bool
    echo: bool = False
    prompt_param: str = "prompt"       # the field the prompt came in: "prompt", or "messages" for a chat

    @property
    def plain_events(self) -> bool:
        """Its streamed tokens carry text only (no logprobs, no routing): responses.plain_chunk and sse_fast."""
        return not self.logprobs and not self.return_routing


class GatewayCore:
    """The HTTP-free heart of the gateway: validate, run the engine, shape responses, log, count."""

    def __init__(self, engine: Any, codec: TextCodec, log: TrafficLog, metrics: GatewayMetrics,
                 settings: GatewaySettings, keys: Any = None) -> None:
        self.engine, self.codec, self.log, self.metrics, self.settings = engine, codec, log, metrics, settings
        self.keys = keys                      # an orchestrator.keys.KeyGuard, or None: no key checks at all
        self._open: dict[str, _Trace] = {}
        self._draining = False
        self.admission = Admission(settings.max_active, settings.max_queued, settings.queue_timeout_s)
        metrics.admission_queued.set_function(lambda: self.admission.queued)    # read at each scrape
        self.started = time.time()
        self.gate_error: str | None = None    # the last failed live gate swap (the previous gate stays live)
        self.fingerprint = engine.infos[0].tokenizer_fingerprint if engine.infos else None
        metrics.set_gate(engine.gate_version)
        if hasattr(engine, "clock"):
            metrics.attach_phases(engine.clock)
        if hasattr(engine, "sessions_by_replica"):
            metrics.attach_engine(engine)

    @property
    def models(self) -> list[str]:
        return self.engine.models

    def set_gate(self, gate: Any) -> None:
        self.engine.set_gate(gate)
        self.metrics.set_gate(gate.version)
        logger.info("gate swapped to %s", gate.version)

    # ---- generation endpoints -----------------------------------------------------------------------

    async def handle(self, request: Request, endpoint: str) -> Response:
        prefix = "cmpl" if endpoint == "completions" else "chatcmpl"
        trace = _Trace(f"{prefix}-{uuid.uuid4().hex}", endpoint)
        trace.api_key = getattr(request.state, "api_key", None)     # set by the keys.user dependency
        self._open[trace.request_id] = trace
        self.metrics.in_flight.inc()
        streaming = False
        try:
            if self._draining:
                raise OpenAIError("the service is shutting down", status=503, type="server_error")
            body = await read_json(request, self.settings.max_request_bytes)
            trace.model = str(body.get("model", ""))[:200]
            schema = api.CompletionRequest if endpoint == "completions" else api.ChatCompletionRequest
            try:
                req = schema.model_validate(body)
            except ValidationError as exc:
                raise api.error_from_validation(exc) from None
            # The fingerprint says which tokenizer made prompt_ids/output_ids (retraining refuses a mismatch).
            trace.model, trace.params = req.model, {**req.log_params(), "tokenizer_fingerprint": self.fingerprint}
            prep = self._prepare(req, trace)
            if self.keys is not None:           # the key's rpm/tpm/stream limits, across all replicas: 429
                trace.ticket = await self.keys.admit(trace.api_key, len(prep.request.prompt_ids))
            try:
                await self.admission.acquire()
            except AtCapacity as exc:
                self.metrics.admission_rejected.inc()
                raise overloaded(exc) from None
            trace.admitted = True
            self.log.write(trace.record(complete=False))    # on record even if the process is killed mid-way
            if prep.echo and prep.request.params.max_tokens == 0:
                return JSONResponse(await self._echo_only(prep, trace))
            deltas = self._deltas(prep, trace)
            try:
                first = await anext(deltas)
            except RequestRejected as exc:     # an expert refused the input
                raise rejected(exc, prep.prompt_param) from None
            except (ExpertsUnavailable, AtCapacity) as exc:
                raise overloaded(exc) from None
            if prep.stream:
                streaming = True

                async def on_close() -> None:     # also when the body never started (client gone early)
                    await deltas.aclose()
                    if not trace.done:
                        trace.error, trace.status = trace.error or "client disconnected", 499
                        self._finish(trace)

                return ClosingStreamingResponse(self._sse(prep, trace, first, deltas), on_close,
                                                media_type="text/event-stream",
                                                headers={REQUEST_ID_HEADER: trace.request_id})
            collected = [first] + [d async for d in deltas]
            # echo + logprobs with generation: the prompt's own logprobs come first, as in OpenAI's API
            prompt_lp = await self._score_prompt(prep) if prep.echo and prep.logprobs else None
            headers = {REQUEST_ID_HEADER: trace.request_id}
            degraded = sum(1 for ev in trace.events if ev.routing.degraded)
            if degraded:
                headers[DEGRADED_HEADER] = str(degraded)
            return JSONResponse(self._final_body(prep, trace, collected, prompt_lp), headers=headers)
        except OpenAIError as exc:
            trace.error, trace.status = exc.message, exc.status
            return JSONResponse(exc.body(), status_code=exc.status,
                                headers={REQUEST_ID_HEADER: trace.request_id, **exc.headers})
        except asyncio.CancelledError:         # the client went away while we were generating
            trace.error, trace.status = "client disconnected", 499
            raise
        except Exception as exc:               # a bug or a dead expert, never the client's input
            logger.exception("request %s failed", trace.request_id)
            trace.error, trace.status = f"{type(exc).__name__}: {exc}", 500
            err = OpenAIError(f"internal error ({type(exc).__name__}); request id {trace.request_id}",
                              status=500, type="server_error")
            return JSONResponse(err.body(), status_code=500, headers={REQUEST_ID_HEADER: trace.request_id})
        finally:
            if not streaming:
                self._finish(trace)

    def _prepare(self, req: api.CompletionRequest | api.ChatCompletionRequest, trace: _Trace) -> _Prepared:
        stops = req.stop_list()
        prompt_text: str | None
        if isinstance(req, api.ChatCompletionRequest):
            chat = self.codec.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            prompt_text, ids = chat.text, self.codec.encode(chat.text, chat.add_special_tokens)
            stops += [s for s in chat.implicit_stops if s not in stops]
            max_tokens, top_logprobs = req.token_budget(), (req.top_logprobs or 0) if req.logprobs else 0
            logprobs, echo, prompt_param = req.logprobs, False, "messages"
        else:
            prompt_text, ids = (req.prompt, self.codec.encode(req.prompt)) if isinstance(req.prompt, str) else \
                (None, list(req.prompt))
            max_tokens = req.max_tokens if req.max_tokens is not None else self.settings.default_max_tokens
            logprobs, top_logprobs, echo, prompt_param = req.logprobs is not None, req.logprobs or 0, req.echo, "prompt"
        trace.prompt_ids, trace.prompt_text = tuple(ids), prompt_text or ""      # logged even if refused
        if max_tokens is None:                  # a chat without a budget: the rest of the context
            max_tokens = max(self.engine.max_model_len - len(ids), 0)
        params = GenerationParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k if req.top_k and 0 < req.top_k < self.engine.vocab_size else 0,     # 0: all tokens
            seed=None if req.seed is None else req.seed % 2**63, ignore_eos=req.ignore_eos,
            top_logprobs=top_logprobs)
        request = GenerationRequest(trace.request_id, tuple(ids), params, req.model, req.experts_per_token)
        refused = None
        try:
            self._check(request, prompt_param)
        except OpenAIError as exc:
            refused = exc
        # Token ids are logged as text too whenever they decode, refused or not (accepted ones are in the vocabulary).
        if prompt_text is None and (refused is None or outside_vocabulary(ids, self.engine.vocab_size) is None):
            trace.prompt_text = prompt_text = self.codec.decode(ids)
        if refused is not None:
            raise refused
        return _Prepared(request, prompt_text, tuple(stops), req.stream, req.include_usage(), req.return_routing,
                         logprobs, echo, prompt_param)

    def _check(self, request: GenerationRequest, prompt_param: str) -> None:
        """The engine's checks of a request (orchestrator/request_checks.py), as an OpenAI error; the prompt is
        named by the field it came in (`prompt` or `messages`)."""
        try:
            self.engine.validate(request)
        except RequestRejected as exc:
            raise rejected(exc, prompt_param) from None

    async def _deltas(self, prep: _Prepared, trace: _Trace) -> AsyncIterator[TextDelta]:
        """The engine's tokens as text; records every token in the trace and the metrics as it passes."""
        events = self.engine.generate(prep.request)
        trace.gate_version = self.engine.gate_version      # the engine pins this gate on its first step
        tapped = self._tap(events, trace)
        text = stream_text(tapped, self.codec.detokenizer(prep.request.prompt_ids), StopMatcher(prep.stops),
                           self.engine.clock)
        try:
            async for delta in text:
                trace.output_text += delta.text
                trace.finish_reason = delta.finish_reason
                yield delta
        finally:
            # A stop string ends the text before the engine stops: close it so its sessions are freed.
            await text.aclose()
            await tapped.aclose()
            await events.aclose()

    async def _tap(self, events: AsyncIterator[TokenEvent], trace: _Trace) -> AsyncIterator[TokenEvent]:
        last = trace.t0
        async for ev in events:
            now = time.perf_counter()
            first = not trace.events
            if first:
                trace.ttft_s = now - trace.t0
            self.metrics.token(trace.model, ev, now - last, first)
            last = now
            trace.events.append(ev)
            yield ev

    async def _score_prompt(self, prep: _Prepared) -> api.CompletionLogprobs:
        req = prep.request
        if len(req.prompt_ids) == 1:          # nothing to score: the first token has no logprob
            return self._prompt_logprobs(req.prompt_ids, [(None, ())])
        try:
            scores = await self.engine.score(req.request_id, list(req.prompt_ids), req.model, req.params.top_logprobs)
        except RequestRejected as exc:
            raise rejected(exc, prep.prompt_param) from None
        return self._prompt_logprobs(req.prompt_ids, scores)

    async def _echo_only(self, prep: _Prepared, trace: _Trace) -> dict:
        """echo=true, max_tokens=0: the prompt back, with its per-token logprobs if asked (lm-eval scoring)."""
        req = prep.request
        trace.gate_version, trace.finish_reason = self.engine.gate_version, "length"
        logprobs = await self._score_prompt(prep) if prep.logprobs else None
        trace.output_text = ""
        choice = api.CompletionChoice(text=prep.prompt_text, logprobs=logprobs, finish_reason="length")
        return api.CompletionResponse(id=req.request_id, created=int(trace.created), model=req.model,
                                      system_fingerprint=trace.gate_version, choices=[choice],
                                      usage=responses.usage_of(len(req.prompt_ids), [])).model_dump()

    def _prompt_logprobs(self, ids: tuple[int, ...], scores: list) -> api.CompletionLogprobs:
        _, offsets = self.codec.offsets(ids)
        tt = self.codec.token_text
        return api.CompletionLogprobs(
            tokens=[tt(t) for t in ids], token_logprobs=[lp for lp, _ in scores],
            top_logprobs=[None if lp is None else {tt(t): v for t, v in alts} for lp, alts in scores],
            text_offset=offsets)

    # ---- response shapes -----------------------------------------------------------------------------

    def _routing(self, prep: _Prepared, trace: _Trace, events) -> api.Routing | None:
        return responses.routing_of(events, self.codec.token_text, trace.gate_version) if prep.return_routing else None

    @staticmethod
    def _head(trace: _Trace) -> dict:
        return {"id": trace.request_id, "created": int(trace.created), "model": trace.model,
                "system_fingerprint": trace.gate_version}

    def _final_body(self, prep: _Prepared, trace: _Trace, deltas: list[TextDelta],
                    prompt_logprobs: api.CompletionLogprobs | None = None) -> dict:
        req, ev, tt = prep.request, trace.events, self.codec.token_text
        text = "".join(d.text for d in deltas)
        head = {**self._head(trace), "usage": responses.usage_of(len(req.prompt_ids), ev)}
        if trace.endpoint == "completions":
            echo = prep.prompt_text if prep.echo else ""
            lp = responses.completion_logprobs(ev, tt, len(echo)) if prep.logprobs else None
            if lp is not None and prompt_logprobs is not None:
                lp = responses.concat_logprobs(prompt_logprobs, lp)
            choice = api.CompletionChoice(text=echo + text, logprobs=lp, finish_reason=trace.finish_reason,
                                          routing=self._routing(prep, trace, ev))
            return api.CompletionResponse(**head, choices=[choice]).model_dump()
        choice = api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=trace.finish_reason,
                                logprobs=responses.chat_logprobs(ev, tt) if prep.logprobs else None,
                                routing=self._routing(prep, trace, ev))
        return api.ChatCompletionResponse(**head, choices=[choice]).model_dump()

    def _chunk(self, prep: _Prepared, trace: _Trace, delta: TextDelta | None) -> dict:
        """One SSE event; delta None is the chat opener (role only)."""
        if prep.plain_events and delta is not None:
            return plain_chunk(trace.endpoint, trace.request_id, int(trace.created), trace.model,
                               trace.gate_version, delta.text, delta.finish_reason)
        tt, ev = self.codec.token_text, (delta.events if delta else ())
        head = self._head(trace)
        finish, routing = (delta.finish_reason if delta else None), (self._routing(prep, trace, ev) if ev else None)
        if trace.endpoint == "completions":
            lp = responses.completion_logprobs(ev, tt, len(trace.output_text) - len(delta.text)) if prep.logprobs else None
            choice = api.CompletionChoice(text=delta.text, logprobs=lp, finish_reason=finish, routing=routing)
            return api.CompletionResponse(**head, choices=[choice]).model_dump()
        content = api.ChatDelta(role="assistant", content="") if delta is None else api.ChatDelta(content=delta.text)
        choice = api.ChatChunkChoice(delta=content, finish_reason=finish, routing=routing,
                                     logprobs=responses.chat_logprobs(ev, tt) if prep.logprobs and ev else None)
        return api.ChatCompletionChunk(**head, choices=[choice]).model_dump()

    async def _sse(self, prep: _Prepared, trace: _Trace, first: TextDelta,
                   deltas: AsyncIterator[TextDelta]) -> AsyncIterator[str]:
        clock = self.engine.clock
        try:
            if trace.endpoint == "chat.completions":
                yield sse(self._chunk(prep, trace, None))
            frame = sse_fast if prep.plain_events else sse     # floats keep json.dumps' spelling
            yield frame(self._chunk(prep, trace, first))
            async for delta in deltas:
                t0 = time.perf_counter()
                event = frame(self._chunk(prep, trace, delta))
                clock.add("sse", time.perf_counter() - t0)
                yield event
            if prep.include_usage:
                usage = responses.usage_of(len(prep.request.prompt_ids), trace.events).model_dump()
                obj = "text_completion" if trace.endpoint == "completions" else "chat.completion.chunk"
                yield sse({**self._head(trace), "object": obj, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            trace.error, trace.status = "client disconnected", 499
            raise
        except (ExpertsUnavailable, AtCapacity) as exc:   # headers are sent: report in-band, as OpenAI does
            err = overloaded(exc)
            trace.error, trace.status = err.message, err.status
            yield sse(err.body())
            yield "data: [DONE]\n\n"
        except RequestRejected as exc:                    # an expert refused the input after the first token
            err = rejected(exc, prep.prompt_param)
            trace.error, trace.status = err.message, err.status
            yield sse(err.body())
            yield "data: [DONE]\n\n"
        except Exception as exc:
            logger.exception("stream %s failed", trace.request_id)
            trace.error, trace.status = f"{type(exc).__name__}: {exc}", 500
            yield sse(OpenAIError(f"internal error ({type(exc).__name__})", status=500, type="server_error").body())
            yield "data: [DONE]\n\n"
        finally:
            await deltas.aclose()
            self._finish(trace)

    # ---- bookkeeping ---------------------------------------------------------------------------------

    def _finish(self, trace: _Trace) -> None:
        """Exactly once per request: log it, count it."""
        if trace.done:
            return
        trace.done = True
        if trace.admitted:
            self.admission.release()
        if trace.ticket is not None:
            self.keys.settle(trace.api_key, trace.ticket, len(trace.events))
        self._open.pop(trace.request_id, None)
        self.metrics.in_flight.dec()
        model = trace.model if trace.model in self.models else "unknown"   # clients must not mint label values
        self.metrics.prompt_tokens.labels(model=model).inc(len(trace.prompt_ids))
        self.metrics.request_done(trace.endpoint, model, trace.status, time.perf_counter() - trace.t0)
        with self.engine.clock.phase("log"):
            self.log.write(trace.record())

    async def feedback(self, request: Request) -> Response:
        try:
            try:
                fb = api.FeedbackRequest.model_validate(await read_json(request, self.settings.max_request_bytes))
            except ValidationError as exc:
                raise api.error_from_validation(exc) from None
            await asyncio.to_thread(self.log.flush)          # the response may have been logged just now
            if not await self._may_rate(getattr(request.state, "api_key", None), fb.request_id):
                raise OpenAIError(f"no logged request with id {fb.request_id!r}", status=404,
                                  param="request_id", code="request_not_found")
            rec = self.log.add_feedback(fb.request_id, fb.rating, fb.corrected_text)
            return JSONResponse(api.FeedbackResponse(id=rec.feedback_id, request_id=fb.request_id,
                                                     rating=fb.rating).model_dump())
        except OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def _may_rate(self, key: Any, request_id: str) -> bool:
        """Whether the request is on record and, once keys exist, was made by `key` (an admin key may rate
        any). Someone else's request looks exactly like a missing one, so ids cannot be probed."""
        if key is None:                                  # the service runs open, as before keys
            return await asyncio.to_thread(self.log.has_request, request_id)
        try:
            found, owner = await asyncio.to_thread(self.log.request_owner, request_id)
        except StoreError:
            if key.admin:
                return True
            raise OpenAIError("feedback cannot be checked now (the traffic store is unreachable)", status=503,
                              type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return found and (key.admin or owner == key.name)

    def health(self) -> tuple[int, dict]:
        """200 while the gateway can serve (every expert ok, or "degraded": some down or failing lately);
        503 when it cannot (draining, traffic log writer dead, or no expert answering)."""
        experts = self.engine.health.report()
        status = experts["status"]
        if self._draining or not self.log.healthy or status == "down":
            status = "unavailable"
        body = {"status": status, "gate_version": self.engine.gate_version, "models": self.models,
                "in_flight": len(self._open), "experts": experts["experts"]}
        if not self.log.healthy:
            body["traffic_log"] = "writer stopped"
        if self.gate_error:
            body["gate_error"] = self.gate_error
        return (503 if status == "unavailable" else 200), body

    async def drain(self) -> None:
        """Refuse new requests (503) and wait, up to drain_timeout_s, for in-flight ones to finish."""
        self._draining = True
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def resume(self) -> None:
        self._draining = False

    async def aclose(self) -> None:
        """Graceful stop: drain, log the stragglers as interrupted, flush the traffic log."""
        await self.drain()
        for trace in list(self._open.values()):
            trace.error, trace.status = trace.error or "interrupted by shutdown", 503
            self._finish(trace)
        await asyncio.to_thread(self.log.close)
        if self.keys is not None:
            await asyncio.to_thread(self.keys.close)
        if hasattr(self.engine, "stop"):
            await self.engine.stop()
