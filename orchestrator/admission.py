"""Admission control at the edge: at most `max_active` generations per gateway replica, a bounded wait queue.

A request beyond `max_active` waits its turn (first come, first served) for up to `queue_timeout_s`; when
the queue already holds `max_queued`, or the wait runs out, it is refused with AtCapacity (a 429 with
Retry-After), never a 500 and never an unbounded pile-up in front of the experts' session slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from orchestrator.types import AtCapacity


class Admission:
    def __init__(self, max_active: int, max_queued: int, queue_timeout_s: float) -> None:
        if max_active < 1 or max_queued < 0 or queue_timeout_s < 0:
            raise ValueError("admission needs max_active >= 1, max_queued >= 0, queue_timeout_s >= 0")
        self.max_active, self.max_queued, self.queue_timeout_s = max_active, max_queued, queue_timeout_s
        self.active = 0
        self.rejected = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queued:
            self.rejected += 1
            raise AtCapacity(f"{self.active} requests running and {len(self._waiters)} waiting on this gateway replica")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():    # granted just as the wait ran out: keep it
                return
            self._drop(waiter)
            self.rejected += 1
            raise AtCapacity(f"waited {self.queue_timeout_s:.0f} s for a free slot") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():    # granted, but the client went away: pass it on
                self.release()
            else:
                self._drop(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)                     # the slot passes straight to the next waiter
                return
        self.active -= 1

    def _drop(self, waiter: asyncio.Future) -> None:
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
