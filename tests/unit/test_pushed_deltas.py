"""Native generations' deltas pushed over the data plane (`watch`): a real Generations, a real DataPlaneServer on
localhost and a real ServeExpertClient, with a fake engine and a fake Serve handle for the control plane.

The tokens reach the stream with no poll per token; one engine turn's deltas leave as one message; a watch that
ends puts the deltas back in the outbox (nothing lost); a cut connection ends the streams on it with an error and
their generations are aborted on the replica once the client has reconnected."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from experts.client import ServeExpertClient
from experts.data_plane import DataPlaneServer
from experts.generations import Generations
from experts.protocol import GenerateDelta, GenerateRequest, PollReply, StartReply
from tests.serve_fakes import FakeHandle


class GatedEngine:
    """One (non-raw) output per token the test releases for that request."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Queue] = {}

    def gate(self, rid: str) -> asyncio.Queue:
        return self.gates.setdefault(rid, asyncio.Queue())

    async def generate(self, prompt, params, request_id):
        gate = self.gate(request_id.split("#")[0].removeprefix("gen-"))
        while True:
            token = await gate.get()
            out = SimpleNamespace(token_ids=[token], logprobs=None, finish_reason=None)
            yield SimpleNamespace(outputs=[out], finished=False)


class PushingReplica(FakeHandle):
    """Control plane (start, endpoint) through the fake handle; poll and watch over a real data plane."""

    def __init__(self, gens: Generations) -> None:
        self.gens = gens
        self.polls = 0
        self.server = DataPlaneServer({"poll": self.poll, "watch": self.watch}, "127.0.0.1")

    async def poll(self, caller, aborts, wait_s):
        self.polls += 1
        return PollReply("r1", tuple(await self.gens.poll(caller, aborts, wait_s)))

    async def watch(self, caller, emit):
        await self.gens.watch(caller, lambda deltas: emit(PollReply("r1", tuple(deltas))))

    async def _endpoint(self, replica=None):
        return await self.server.start()

    async def _start(self, requests, caller, replica=None):
        for req in requests:
            self.gens.start(caller, req)
        return StartReply("r1", tuple(None for _ in requests))


@pytest.fixture
async def replica(monkeypatch):
    # Generations._drive imports this on its first run, on the event loop: cold, it takes ≈ 5 s, which would
    # count against the per-token timeouts below (a replica has it imported long before: its engine uses it).
    import vllm.inputs  # noqa: F401

    monkeypatch.setattr("experts.generations.generation_params", lambda req: None)
    engine = GatedEngine()
    replica = PushingReplica(Generations(engine))
    replica.engine = engine
    yield replica
    replica.gens.abort_all()
    await replica.server.close()


def _request(rid: str) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_ids=(1, 2), max_tokens=64)


async def _until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_tokens_arrive_pushed_without_a_poll_per_token_and_an_early_stop_aborts_on_the_replica(replica) -> None:
    client = ServeExpertClient(replica, "code", call_timeout_s=5, poll_wait_s=30.0)   # no heartbeat in this test
    stream = client.generate(_request("a"))
    gate = replica.engine.gate("a")
    received = []
    for token in range(20):
        gate.put_nowait(token)
        received.append((await asyncio.wait_for(anext(stream), 5)).token_ids)
    assert received == [(t,) for t in range(20)]
    assert replica.polls <= 1, f"{replica.polls} polls for 20 tokens: the deltas were not pushed"
    assert replica.server.calls_served <= 2                      # the first poll and the one watch
    await stream.aclose()                                         # the consumer stops early
    await _until(lambda: len(replica.gens) == 0, "the generation aborted on the replica")
    await client.aclose()


async def test_one_engine_turns_deltas_leave_as_one_message() -> None:
    gens = Generations(engine=None)
    pushed: list[list[GenerateDelta]] = []
    watch = asyncio.ensure_future(gens.watch("c", pushed.append))
    await asyncio.sleep(0)
    gens._push("c", GenerateDelta("a", token_ids=(1,)))
    gens._push("c", GenerateDelta("b", token_ids=(2,)))
    await asyncio.sleep(0)
    assert [[d.request_id for d in batch] for batch in pushed] == [["a", "b"]]
    watch.cancel()


async def test_deltas_wait_in_the_outbox_when_no_watch_takes_them() -> None:
    """Before a watch starts, and after one ends (its connection went), the deltas are kept for the next watch
    or poll, in order; a newer watch of the same caller replaces the older."""
    gens = Generations(engine=None)
    gens._push("c", GenerateDelta("a", token_ids=(1,)))
    pushed: list[list[GenerateDelta]] = []
    first = asyncio.ensure_future(gens.watch("c", pushed.append))
    await asyncio.sleep(0)
    assert [[d.token_ids for d in b] for b in pushed] == [[(1,)]]     # what was held, at once
    first.cancel()                                                   # it ends before this turn's push leaves
    gens._push("c", GenerateDelta("a", token_ids=(2,)))
    await asyncio.gather(first, return_exceptions=True)
    gens._push("c", GenerateDelta("a", token_ids=(3,)))
    assert [d.token_ids for d in await gens.poll("c", [], 0.0)] == [(2,), (3,)]
    again: list[list[GenerateDelta]] = []
    second = asyncio.ensure_future(gens.watch("c", pushed.append))
    third = asyncio.ensure_future(gens.watch("c", again.append))
    await asyncio.sleep(0)
    await asyncio.wait_for(second, 5)                                 # replaced: it returns
    gens._push("c", GenerateDelta("a", token_ids=(4,)))
    await asyncio.sleep(0)
    assert [[d.token_ids for d in b] for b in again] == [[(4,)]]
    third.cancel()


async def test_a_cut_connection_ends_its_streams_with_an_error_and_aborts_them_after_reconnecting(replica) -> None:
    client = ServeExpertClient(replica, "code", call_timeout_s=5, poll_wait_s=30.0)
    stream = client.generate(_request("a"))
    replica.engine.gate("a").put_nowait(1)
    assert (await asyncio.wait_for(anext(stream), 5)).token_ids == (1,)
    assert replica.server.cut() == 1                                  # a real TCP reset
    delta = await asyncio.wait_for(anext(stream), 5)
    assert delta.error_kind == "unavailable" and "lost" in delta.error
    await _until(lambda: len(replica.gens) == 0, "the cut generation aborted on the replica")
    assert replica.server.connections_accepted == 2                   # the abort went over a new connection
    await stream.aclose()
    await client.aclose()
