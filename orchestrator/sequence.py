"""One lockstep request's decoding state, owned by the decode loop: its tokens, gate state, expert sessions.

The request's own coroutine (EnsembleEngine.generate) reads TokenEvents from `events`; the loop writes them:
`emit` records a token at once and holds its event until the loop's `deliver` (the loop delivers a round's
events once the next round's expert calls are on their way, so that the readers' work overlaps the experts').
Either side may end it: the loop when it finishes or fails, the reader when its client goes away (`cancel`).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import numpy as np

from gating.runtime import GateRuntime, GateState
from orchestrator.types import GenerationParams, TokenEvent


@dataclass(eq=False)
class Sequence:
    request_id: str
    tokens: list[int]                      # prompt, then every generated token
    params: GenerationParams
    rng: np.random.Generator
    space: str                             # mixing space ("logits" | "probs")
    k: int = 1                             # experts per token
    gate: GateRuntime | None = None        # pinned when the request starts: a live swap does not move it
    fixed_expert: int | None = None        # model=<expert>: that expert makes every token
    gate_state: GateState | None = None
    synced: dict[int, int] = field(default_factory=dict)        # expert -> tokens its session holds
    sessions: dict[int, str] = field(default_factory=dict)      # expert -> current session id
    produced: int = 0
    done: bool = False                     # finished, failed or cancelled: the loop retires it
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    held: list[TokenEvent] = field(default_factory=list)       # emitted, not yet delivered to the reader
    _ids: itertools.count = field(default_factory=itertools.count)

    def session_of(self, expert: int) -> str:
        sid = self.sessions.get(expert)
        if sid is None:
            sid = self.sessions[expert] = f"{self.request_id}.{expert}.{next(self._ids)}"
        return sid

    def forget(self, expert: int) -> str | None:
        """The expert's session is gone (or unusable): the next step re-opens it from the whole history."""
        self.synced.pop(expert, None)
        return self.sessions.pop(expert, None)

    def emit(self, event: TokenEvent) -> None:
        """Record the token now; its event reaches the reader at the next `deliver`."""
        self.produced += 1
        self.held.append(event)
        if event.finish_reason is not None:
            self.done = True

    def deliver(self) -> None:
        for event in self.held:
            self.events.put_nowait(event)
        self.held.clear()

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self.deliver()                      # the tokens made before the failure come first
            self.events.put_nowait(error)

    def cancel(self) -> None:
        self.done = True

    async def next_event(self) -> TokenEvent:
        item = await self.events.get()
        if isinstance(item, Exception):
            raise item
        return item
