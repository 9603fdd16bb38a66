"""Coalesce the steps of many concurrent sequences for one expert into one call.

While a call to the expert is in flight, new steps queue up; when it returns, everything queued leaves
in the next call. No timer and no added latency at low load; at high load one round trip carries every
sequence's step (the round trip, not the math, is the dominant cost: see shared/FACTS.md).
"""

from __future__ import annotations

import asyncio
import logging

from experts.protocol import Expert, SessionStep, StepOutput

log = logging.getLogger(__name__)


class StepBatcher:
    def __init__(self, name: str, expert: Expert, top_k: int) -> None:
        self.name = name
        self.expert = expert
        self.top_k = top_k
        self._opens: list[tuple[SessionStep, asyncio.Future]] = []
        self._advances: list[tuple[SessionStep, asyncio.Future]] = []
        self._closes: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.calls = 0           # round trips made (for tests and metrics)
        self.steps = 0           # sequence steps carried

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def open(self, step: SessionStep) -> asyncio.Future:
        return self._enqueue(self._opens, step)

    def advance(self, step: SessionStep) -> asyncio.Future:
        return self._enqueue(self._advances, step)

    def close(self, session_id: str) -> None:
        """Fire and forget: freed with the next round trip."""
        self._closes.append(session_id)
        self._wake.set()

    def _enqueue(self, queue: list, step: SessionStep) -> asyncio.Future:
        self.start()
        fut = asyncio.get_running_loop().create_future()
        queue.append((step, fut))
        self._wake.set()
        return fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            opens, self._opens = self._opens, []
            advances, self._advances = self._advances, []
            closes, self._closes = self._closes, []
            await asyncio.gather(
                self._call(self.expert.open, opens),
                self._call(self.expert.advance, advances),
                self._close(closes),
            )

    async def _call(self, method, items: list[tuple[SessionStep, asyncio.Future]]) -> None:
        if not items:
            return
        self.calls += 1
        self.steps += len(items)
        try:
            outputs: list[StepOutput] = await method([step for step, _ in items], self.top_k)
        except Exception as exc:  # the expert (or its replica) failed: fail these steps, keep serving others
            log.exception("expert %s: batched call failed", self.name)
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(RuntimeError(f"expert {self.name} failed: {exc}"))
            return
        for (_, fut), out in zip(items, outputs):
            if not fut.done():
                fut.set_result(out)

    async def _close(self, session_ids: list[str]) -> None:
        if session_ids:
            try:
                await self.expert.close(session_ids)
            except Exception:
                log.exception("expert %s: closing %d sessions failed", self.name, len(session_ids))
