"""ServeExpertClient over a fake Serve handle: sessions given up on after a timeout (a slow or SIGSTOPped
replica) are closed on that replica once it answers again, and forgotten when it is gone.

They once stayed open until the replica's idle reaper (600 s), holding session slots after every hang."""

from __future__ import annotations

import asyncio

from experts.client import ServeExpertClient
from experts.protocol import SessionStep, StepOutput, StepReply, TopK
from experts.replica_router import ReplicaGone
from tests.serve_fakes import FakeHandle


class Replica(FakeHandle):
    """One replica `r1` that can hang (every call waits until `resume`) or be gone."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.running.set()
        self.gone = False
        self.open_sessions: set[str] = set()
        self.closed: list[list[str]] = []

    async def _serve(self) -> None:
        if self.gone:
            raise ReplicaGone("replica r1 of expert-code is gone")
        await self.running.wait()

    async def _open(self, steps, top_k, replica=None):
        self.open_sessions.update(s.session_id for s in steps)
        await self._serve()
        return StepReply("r1", tuple(StepOutput(s.session_id, TopK.of((1,), (0.0,)), replica="r1") for s in steps), 0.0)

    async def _advance(self, steps, top_k, replica=None):
        await self._serve()
        return StepReply("r1", tuple(StepOutput(s.session_id, TopK.of((1,), (0.0,)), replica="r1") for s in steps), 0.0)

    async def _close(self, ids, replica=None):
        await self._serve()
        self.closed.append(list(ids))
        self.open_sessions -= set(ids)


def _client(replica: Replica, give_up_s: float = 30.0) -> ServeExpertClient:
    client = ServeExpertClient(replica, "code", call_timeout_s=0.05)
    client.abandon_retry_s = (0.01, 0.05, give_up_s)
    return client


async def _until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_sessions_of_a_replica_that_timed_out_are_closed_when_it_answers_again() -> None:
    replica = Replica()
    client = _client(replica)
    steps = [SessionStep("s1", (1, 2)), SessionStep("s2", (3,))]
    assert all(o.error is None for o in await client.open(steps, 1))

    replica.running.clear()                                   # SIGSTOP
    outs = await client.advance([SessionStep("s1", (4,)), SessionStep("s2", (5,))], 1)
    assert {o.error_kind for o in outs} == {"unavailable"}
    assert client.abandoned == {"r1": {"s1", "s2"}} and replica.open_sessions == {"s1", "s2"}

    replica.running.set()                                     # SIGCONT
    await _until(lambda: not client.abandoned)
    assert replica.open_sessions == set() and sorted(i for ids in replica.closed for i in ids) == ["s1", "s2"]
    await client.aclose()


async def test_a_close_that_times_out_is_retried_until_the_replica_answers() -> None:
    replica = Replica()
    client = _client(replica)
    await client.open([SessionStep("s1", (1,))], 1)
    replica.running.clear()
    await client.close(["s1"])
    assert client.abandoned == {"r1": {"s1"}}
    await asyncio.sleep(0.1)                                  # several retries time out meanwhile
    assert replica.open_sessions == {"s1"}
    replica.running.set()
    await _until(lambda: not client.abandoned)
    assert replica.open_sessions == set()
    await client.aclose()


async def test_abandoned_sessions_of_a_replica_that_is_gone_are_forgotten() -> None:
    replica = Replica()
    client = _client(replica)
    await client.open([SessionStep("s1", (1,))], 1)
    replica.running.clear()
    await client.advance([SessionStep("s1", (2,))], 1)
    replica.gone = True                                       # Serve replaced it: the sessions went with it
    replica.running.set()
    await _until(lambda: not client.abandoned)
    assert replica.closed == []
    await client.aclose()


async def test_a_replica_that_never_answers_is_given_up_on_for_its_idle_reaper() -> None:
    replica = Replica()
    client = _client(replica, give_up_s=0.2)
    await client.open([SessionStep("s1", (1,))], 1)
    replica.running.clear()
    await client.advance([SessionStep("s1", (2,))], 1)
    await _until(lambda: not client.abandoned)
    assert replica.closed == [] and replica.open_sessions == {"s1"}
    await client.aclose()
