"""Native generations inside one engine: vLLM decodes a request on its own; deltas wait in the caller's outbox.

The single-expert fast path. A caller (one gateway replica) `start`s requests, then receives their deltas
one of two ways. Over a replica's data plane it `watch`es: a sink is attached, and the deltas of all its
generations produced in one turn of the event loop (one engine step) leave as one pushed message, with no
request per token. Without one it `poll`s: one call returns every delta since its previous poll. Either
way one message per engine step carries the tokens of every stream, whatever the concurrency. A caller
that stops polling for `lease_s` (its process died or hangs; a watching caller polls with no wait as a
heartbeat) has its generations aborted, so the engine never decodes for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from experts.protocol import GenerateDelta, GenerateRequest
from experts.vllm_engine import PositionLogprobs, describe, generation_params

log = logging.getLogger(__name__)


class Generations:
    def __init__(self, engine: Any, lease_s: float = 30.0) -> None:
        self._engine = engine
        self.lease_s = lease_s
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}       # request id -> (caller, task)
        self._outbox: dict[str, list[GenerateDelta]] = {}           # caller -> deltas not yet polled
        self._ready: dict[str, asyncio.Event] = {}                  # caller -> set when its outbox fills
        self._last_poll: dict[str, float] = {}
        self._ids = itertools.count()
        self._aborted: set[str] = set()                             # ids their caller aborted (no delta owed)
        self._polls: dict[str, asyncio.Task | None] = {}            # caller -> its poll in flight
        self._sinks: dict[str, Sink] = {}                           # caller -> where its deltas are pushed
        self._pushing: dict[str, list[GenerateDelta]] = {}          # caller -> deltas of this loop turn
        # Each delta's sampled-token logprobs, as they leave (the replica's self-check, experts/self_check.py).
        self.on_logprobs: Callable[[tuple[float, ...]], None] | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, caller: str, request: GenerateRequest) -> None:
        """Launch one generation (validated by the caller of this method)."""
        self._reap()
        self._last_poll.setdefault(caller, time.monotonic())
        task = asyncio.get_running_loop().create_task(self._drive(caller, request))
        self._tasks[request.request_id] = (caller, task)

    async def poll(self, caller: str, aborts: list[str], wait_s: float) -> list[GenerateDelta]:
        """Abort `aborts`, then return the caller's deltas, waiting up to wait_s for the first one.

        A caller has one poll in flight; a new one ends a previous one still waiting (its connection was lost:
        left waiting, it would take deltas whose reply nobody reads)."""
        previous = self._polls.get(caller)
        if previous is not None and not previous.done() and previous is not asyncio.current_task():
            previous.cancel()
        self._polls[caller] = asyncio.current_task()
        self._last_poll[caller] = time.monotonic()
        cancelled = []
        for rid in aborts:
            owner, task = self._tasks.get(rid, (None, None))
            if owner == caller and task is not None:
                self._aborted.add(rid)
                task.cancel()
                cancelled.append(task)
        if cancelled:               # aborted in the engine (the task's cleanup) before this poll answers
            await asyncio.gather(*cancelled, return_exceptions=True)
        ready = self._ready.setdefault(caller, asyncio.Event())
        ready.clear()
        if not self._outbox.get(caller) and self._active(caller) and wait_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), wait_s)
        return self._outbox.pop(caller, [])

    async def watch(self, caller: str, sink: Callable[[list[GenerateDelta]], None]) -> None:
        """Push the caller's deltas to `sink` (its outbox first) until cancelled (the caller's connection went)
        or another watch of the same caller replaces this one; then they wait in the outbox again."""
        replaced = asyncio.Event()
        previous = self._sinks.get(caller)
        if previous is not None:
            previous.replaced.set()
        entry = self._sinks[caller] = Sink(sink, replaced)
        self._last_poll[caller] = time.monotonic()
        held = self._outbox.pop(caller, [])
        if held:
            sink(held)
        try:
            await replaced.wait()
        finally:
            if self._sinks.get(caller) is entry:
                del self._sinks[caller]
                self._flush(caller)                     # a turn's deltas not pushed yet: to the outbox

    def forget(self, caller: str) -> None:
        """Drop what is kept for a caller that owns no generation and will not poll again."""
        if not self._active(caller):
            for table in (self._outbox, self._ready, self._last_poll, self._polls):
                table.pop(caller, None)

    def _active(self, caller: str) -> bool:
        return any(owner == caller for owner, _ in self._tasks.values())

    def _push(self, caller: str, delta: GenerateDelta) -> None:
        if delta.logprobs and self.on_logprobs is not None:
            self.on_logprobs(delta.logprobs)
        if caller in self._sinks:
            batch = self._pushing.setdefault(caller, [])
            batch.append(delta)
            if len(batch) == 1:       # the other generations' deltas of this engine step arrive in this turn
                asyncio.get_running_loop().call_soon(self._flush, caller)
            return
        self._outbox.setdefault(caller, []).append(delta)
        self._ready.setdefault(caller, asyncio.Event()).set()

    def _flush(self, caller: str) -> None:
        batch = self._pushing.pop(caller, None)
        if not batch:
            return
        entry = self._sinks.get(caller)
        if entry is not None:
            entry.push(batch)
        else:
            self._outbox.setdefault(caller, []).extend(batch)
            self._ready.setdefault(caller, asyncio.Event()).set()

    async def _drive(self, caller: str, req: GenerateRequest) -> None:
        from vllm.inputs import TokensPrompt

        rid = f"gen-{req.request_id}#{next(self._ids)}"
        prompt = TokensPrompt(prompt_token_ids=list(req.prompt_ids))
        try:
            if getattr(self._engine, "raw_outputs", False):        # InprocEngine: logprob arrays, no dicts
                async for out in self._engine.generate(prompt, generation_params(req), rid, raw=True):
                    if out.new_token_ids or out.finish_reason is not None:
                        self._push(caller, _delta_of_arrays(req, out))
                return
            async for out in self._engine.generate(prompt, generation_params(req), request_id=rid):
                c = out.outputs[0]
                tokens = tuple(int(t) for t in c.token_ids)
                positions: list[PositionLogprobs] = list(c.logprobs or [])
                finish = c.finish_reason if out.finished else None
                self._push(caller, GenerateDelta(
                    req.request_id, tokens,
                    logprobs=tuple(float(p[t].logprob) for p, t in zip(positions, tokens)),
                    top_logprobs=tuple(_alternatives(p, req.top_logprobs) for p in positions) if req.top_logprobs else (),
                    finish_reason=None if finish is None else ("length" if finish == "length" else "stop")))
        except asyncio.CancelledError:
            if req.request_id not in self._aborted:  # reaped or shut down: a live caller must hear of it
                self._push(caller, GenerateDelta(req.request_id, error="generation stopped on the replica "
                                                 "(its caller's lease expired, or the replica is stopping)",
                                                 error_kind="unavailable"))
            raise
        except Exception as exc:  # noqa: BLE001 - report to the caller, keep the engine serving others
            log.warning("generation %s failed: %r", req.request_id, exc)
            self._push(caller, GenerateDelta(req.request_id, error=f"generation failed in the engine: {describe(exc)}",
                                             error_kind="engine"))
        finally:
            self._tasks.pop(req.request_id, None)
            self._aborted.discard(req.request_id)

    def _reap(self) -> None:
        """Abort the generations of callers that stopped polling (e.g. a gateway replica that died)."""
        deadline = time.monotonic() - self.lease_s
        gone = {c for c, t in self._last_poll.items() if t < deadline}
        if not gone:
            return
        for rid, (caller, task) in list(self._tasks.items()):
            if caller in gone:
                task.cancel()
        for caller in gone:
            log.warning("caller %s stopped polling; its generations were aborted", caller)
            self._last_poll.pop(caller, None)
            self._polls.pop(caller, None)
        # Outboxes of callers that are gone and own nothing any more (what a dead caller will never poll).
        for caller in [c for c in self._outbox if c not in self._last_poll]:
            self.forget(caller)

    def abort_all(self) -> None:
        for _, task in self._tasks.values():
            task.cancel()


class Sink:
    """A watching caller's push function, and the event that ends its watch when another replaces it."""

    def __init__(self, push: Callable[[list[GenerateDelta]], None], replaced: asyncio.Event) -> None:
        self.push = push
        self.replaced = replaced


def _alternatives(position: PositionLogprobs, n: int) -> tuple[tuple[int, float], ...]:
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:n]
    return tuple((int(t), float(lp.logprob)) for t, lp in ranked)


def _delta_of_arrays(req: GenerateRequest, out: Any) -> GenerateDelta:
    """A delta from vLLM's raw EngineCoreOutput: per token, column 0 of the logprob rows is the sampled
    token's logprob and columns 1..n the top n (descending)."""
    from vllm.v1.engine import FinishReason

    tokens = tuple(int(t) for t in out.new_token_ids)
    lp = out.new_logprobs
    logprobs: tuple[float, ...] = ()
    alternatives: tuple = ()
    if lp is not None and tokens:
        logprobs = tuple(lp.logprobs[:len(tokens), 0].tolist())
        if req.top_logprobs:
            n = req.top_logprobs
            alternatives = tuple(tuple(zip(ids[1:n + 1].tolist(), vals[1:n + 1].tolist()))
                                 for ids, vals in zip(lp.logprob_token_ids[:len(tokens)], lp.logprobs[:len(tokens)]))
    finish = out.finish_reason
    return GenerateDelta(req.request_id, tokens, logprobs=logprobs, top_logprobs=alternatives,
                         finish_reason=None if finish is None else ("length" if finish == FinishReason.LENGTH else "stop"))
