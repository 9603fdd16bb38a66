"""Decode sessions inside one engine: the state machine open -> advance* -> close, plus the idle reaper.

A session is one resumable vLLM streaming-input request. Each chunk fed (the prompt, then the tokens the
orchestrator chose) is appended to the context and answered with the next position's logprobs. vLLM drops
the token it sampled for a chunk before appending the next one (Scheduler._update_request_as_session), so
only the tokens we feed are ever in the context. Input validation happens before anything reaches here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from experts.protocol import TopK
from experts.vllm_engine import topk_of, topk_of_arrays

log = logging.getLogger(__name__)


class Session:
    """One vLLM streaming-input request."""

    def __init__(self, request_id: str, engine: Any) -> None:
        self.request_id = request_id
        self.length = 0
        self.busy = False
        self.last_used = time.monotonic()
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        self._outputs: AsyncGenerator[Any, None] | None = None
        self._engine = engine
        self._raw = getattr(engine, "raw_outputs", False)    # InprocEngine: logprob arrays, no dicts
        self._direct = False        # started by the engine's open_sessions: no generate() stream of its own
        self._aborted = False       # a direct session's engine request was aborted (closed)
        self._close_requested = False

    async def _inputs(self) -> AsyncGenerator[Any, None]:
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        while (chunk := await self._chunks.get()) is not None:
            tokens, params = chunk
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=tokens), sampling_params=params)

    async def feed(self, tokens: list[int], params: Any) -> TopK:
        """Append `tokens`; the top-k (k = params.logprobs) of the next position."""
        if self._direct:
            (out,) = await _one_engine_command(self._engine.feed_sessions, [(self, tokens)], params)
            if isinstance(out, BaseException):
                raise out
            return out
        self.busy = True
        try:
            self._chunks.put_nowait((tokens, params))
            if self._outputs is None:
                raw = {"raw": True} if self._raw else {}
                self._outputs = self._engine.generate(self._inputs(), params, request_id=self.request_id, **raw)
            out = await anext(self._outputs)
            while self._raw and out.new_logprobs is None:     # an output of a prefill step, not of this position
                out = await anext(self._outputs)
            self.length += len(tokens)
            if self._raw:
                return raw_topk(out, params.logprobs)
            return topk_of(out.outputs[0].logprobs[-1], params.logprobs)
        finally:
            await self._settle()

    async def _settle(self) -> None:
        """After a step: free again, and closed now if a close came in while it ran."""
        self.busy = False
        self.last_used = time.monotonic()
        if self._close_requested:
            await self.close()

    @property
    def batchable(self) -> bool:
        """Open in an engine that takes several sessions' next chunks in one command (SessionTable.feed_many)."""
        return (self._raw and (self._outputs is not None or self._direct)
                and getattr(self._engine, "feeds_sessions", False))

    async def close(self) -> None:
        if self.busy:  # closing mid-step: the running feed() (or batched call) closes it when it returns
            self._close_requested = True
            return
        if self._direct:               # a later feed() is answered "not open in the engine"
            if not self._aborted:
                self._aborted = True
                self._engine.abort_session(self.request_id)
            return
        self._chunks.put_nowait(None)
        if self._outputs is not None:
            # aclose() makes AsyncLLM.generate abort the request, which frees its slot and KV blocks.
            await self._outputs.aclose()
            self._outputs = None


class SessionTable:
    """The open sessions of one engine, by the caller's session id."""

    def __init__(self, engine: Any, idle_timeout_s: float) -> None:
        self._engine = engine
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()  # makes engine request ids unique even when a session id is reused
        self.idle_timeout_s = idle_timeout_s

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(self, session_id: str) -> Session:
        """Register before the first await, so a concurrent open of the same id sees it as a duplicate."""
        session = self._sessions[session_id] = Session(f"{session_id}#{next(self._ids)}", self._engine)
        return session

    def drop(self, session_id: str) -> Session | None:
        """Forget a session without waiting (its engine request is aborted in the background)."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            asyncio.ensure_future(session.close())
        return session

    @property
    def opens_together(self) -> bool:
        """The engine starts several sessions with one command (InprocEngine.open_sessions): see open_many."""
        return bool(getattr(self._engine, "raw_outputs", False) and getattr(self._engine, "opens_sessions", False))

    async def open_many(self, steps: list[tuple[Session, list[int]]], params: Any) -> list[TopK | BaseException]:
        """Start new sessions (from SessionTable.open) with their prompts, with one engine command; per session
        its first top-k, or the exception that refused or ended it. Same effect as a first Session.feed on each.
        Its command is posted before this coroutine first yields, so an advance asked in the same event-loop
        turn shares the opens' engine step."""
        for session, _ in steps:
            session._direct = True              # from now on a close aborts its engine request
        return await _one_engine_command(self._engine.open_sessions, steps, params)

    async def feed_many(self, steps: list[tuple[Session, list[int]]], params: Any) -> list[TopK | BaseException]:
        """Append tokens to several batchable sessions with one engine command (InprocEngine.feed_sessions);
        per session its next top-k, or the exception that ended it. Same effect as Session.feed on each."""
        return await _one_engine_command(self._engine.feed_sessions, steps, params)

    async def close(self, session_ids: list[str]) -> None:
        """Free the sessions' engine slots and KV blocks. Unknown or already closed ids are ignored."""
        sessions = [s for sid in session_ids if (s := self._sessions.pop(sid, None)) is not None]
        await asyncio.gather(*(s.close() for s in sessions))

    async def close_idle(self) -> None:
        """Close sessions nobody advanced for idle_timeout_s: a crashed caller must not leak slots."""
        deadline = time.monotonic() - self.idle_timeout_s
        idle = [sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.busy]
        if idle:
            log.warning("closing %d idle sessions", len(idle))
            await self.close(idle)


async def _one_engine_command(command: Any, steps: list[tuple[Session, list[int]]],
                              params: Any) -> list[TopK | BaseException]:
    """Hand each session's chunk to the engine with one batched command (open_sessions or feed_sessions); per
    session its top-k, or the exception that refused or ended it. The sessions are busy meanwhile."""
    for session, _ in steps:
        session.busy = True
    try:
        outs = await command([(session.request_id, tokens) for session, tokens in steps], params)
    finally:
        for session, _ in steps:
            await session._settle()
    results: list[TopK | BaseException] = []
    for (session, tokens), out in zip(steps, outs):
        if isinstance(out, BaseException):
            results.append(out)
            continue
        session.length += len(tokens)
        results.append(raw_topk(out, params.logprobs))
    return results


def raw_topk(out: Any, k: int) -> TopK:
    """The top-k of the last position of a raw engine output (InprocEngine's EngineCoreOutput)."""
    return topk_of_arrays(out.new_logprobs.logprob_token_ids[-1], out.new_logprobs.logprobs[-1], k)
