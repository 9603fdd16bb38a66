"""The direct replica channel (experts/data_plane.py) over real localhost sockets: typed round trips, calls
answered out of order, a wrong token refused, a cut connection failing exactly the calls in flight, garbage
from either end dropping that connection (never hanging a call or the other connections), and
ServeExpertClient sending pinned calls over it (and falling back to the handle when a replica has none)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest
from ray.serve._private.common import DeploymentID

from experts.client import ServeExpertClient
from experts.data_plane import (
    MAX_FRAME,
    DataPlaneConnection,
    DataPlaneLost,
    DataPlaneServer,
    Endpoint,
    RemoteError,
    frame,
    read_frame,
)
from experts.protocol import (
    GenerateDelta,
    GenerateRequest,
    PollReply,
    SessionStep,
    StartReply,
    StepOutput,
    StepReply,
    TopK,
)
from experts.running_replicas import RUNNING
from tests.serve_fakes import FakeHandle


class Replica:
    def __init__(self, name: str = "r1") -> None:
        self.name = name
        self.release = asyncio.Event()
        self.closed: list[str] = []
        self.polls_cancelled = 0
        self.opened: list[str] = []

    async def advance(self, steps: list[SessionStep], top_k: int) -> StepReply:
        if steps and steps[0].session_id == "boom":
            raise ValueError("bad step")
        outs = tuple(StepOutput(s.session_id, TopK.of((5, 6)[:top_k], (-0.5, -1.5)[:top_k]), length=len(s.token_ids),
                                replica=self.name) for s in steps)
        return StepReply(self.name, outs, 0.001)

    async def open(self, steps: list[SessionStep], top_k: int) -> StepReply:
        self.opened += [s.session_id for s in steps]
        return await self.advance(steps, top_k)

    async def poll(self, caller: str, aborts: list[str], wait_s: float) -> PollReply:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.polls_cancelled += 1
            raise
        return PollReply("r1", (GenerateDelta("g", token_ids=(3, 4), logprobs=(-0.1, -0.2), finish_reason="length",
                                              top_logprobs=(((3, -0.1),), ((4, -0.2),))),))

    async def close(self, session_ids: list[str]) -> None:
        self.closed += session_ids


@pytest.fixture
async def served():
    replica = Replica()
    server = DataPlaneServer({"open": replica.open, "advance": replica.advance, "poll": replica.poll,
                              "close": replica.close}, "127.0.0.1")
    endpoint = await server.start()
    yield replica, server, endpoint
    await server.close()


def test_a_packed_top_k_keeps_every_value_exactly_and_a_malformed_one_is_refused() -> None:
    """TopK travels as two packed arrays (experts/protocol.py): ids and logprobs come back bit for bit (float64:
    neither vLLM's float32 values nor any other float is rounded), and a top-k whose arrays do not pair up is
    refused when it is decoded, not mixed."""
    import msgspec
    import numpy as np

    ids = (0, 7, 2**31 + 5, 65_535)
    lps = (-0.1, -1e-300, -745.0, float(np.float32(-2.3456789)))
    top = TopK.of(ids, lps)
    wire = msgspec.msgpack.encode(StepReply("r1", (StepOutput("s1", top, length=4),), 0.5))
    back = msgspec.msgpack.Decoder(StepReply).decode(wire).outputs[0].topk
    assert back == top and back.k == 4
    assert back.token_ids == ids and back.logprobs == lps
    assert back.id_array.tolist() == list(ids) and back.lp_array.tolist() == list(lps)
    bad = msgspec.msgpack.encode(("s1", (top.ids, top.lps[:-8])))     # a StepOutput one logprob short of the ids
    with pytest.raises(msgspec.ValidationError, match="do not make K pairs"):
        msgspec.msgpack.Decoder(StepOutput).decode(bad)


async def test_typed_round_trip_and_out_of_order_answers(served) -> None:
    replica, server, endpoint = served
    conn = await DataPlaneConnection.open(endpoint, "test")
    slow = asyncio.ensure_future(conn.call("poll", "caller", [], 1.0))     # waits on the replica
    reply = await asyncio.wait_for(conn.call("advance", [SessionStep("s1", (1, 2, 3))], 2), 5)
    assert reply == StepReply("r1", (StepOutput("s1", TopK.of((5, 6), (-0.5, -1.5)), length=3, replica="r1"),), 0.001)
    assert not slow.done()                                  # answered after the later advance
    replica.release.set()
    polled = await asyncio.wait_for(slow, 5)
    assert polled.deltas[0].token_ids == (3, 4) and polled.deltas[0].top_logprobs == (((3, -0.1),), ((4, -0.2),))
    assert await conn.call("close", ["s1"]) is None and replica.closed == ["s1"]
    assert server.connections_accepted == 1 and server.calls_served == 3
    conn.close()


async def test_a_failing_call_is_answered_and_the_connection_lives_on(served) -> None:
    _, _, endpoint = served
    conn = await DataPlaneConnection.open(endpoint, "test")
    with pytest.raises(RemoteError, match="bad step"):
        await asyncio.wait_for(conn.call("advance", [SessionStep("boom", (1,))], 1), 5)
    assert (await asyncio.wait_for(conn.call("advance", [SessionStep("ok", (1,))], 1), 5)).outputs[0].session_id == "ok"
    conn.close()


async def test_a_wrong_token_is_refused(served) -> None:
    _, server, endpoint = served
    conn = await DataPlaneConnection.open(Endpoint(endpoint.host, endpoint.port, "not-the-token"), "test")
    with pytest.raises(DataPlaneLost):
        await asyncio.wait_for(conn.call("advance", [SessionStep("s", (1,))], 1), 5)
    assert server.connections_accepted == 0 and server.calls_served == 0


async def test_a_cut_connection_fails_the_calls_in_flight_and_a_new_one_works(served) -> None:
    replica, server, endpoint = served
    conn = await DataPlaneConnection.open(endpoint, "test")
    pending = asyncio.ensure_future(conn.call("poll", "caller", [], 1.0))
    await asyncio.wait_for(conn.call("advance", [SessionStep("s", (1,))], 1), 5)    # connected and served
    assert server.cut() == 1
    with pytest.raises(DataPlaneLost):
        await asyncio.wait_for(pending, 5)
    assert conn.lost
    for _ in range(100):                      # the replica ends the poll that had no reader left
        if replica.polls_cancelled:
            break
        await asyncio.sleep(0)
    assert replica.polls_cancelled == 1
    with pytest.raises(DataPlaneLost):
        await conn.call("advance", [SessionStep("s", (1,))], 1)
    again = await DataPlaneConnection.open(endpoint, "test")
    assert (await asyncio.wait_for(again.call("advance", [SessionStep("s", (1,))], 1), 5)).replica == "r1"
    assert server.connections_accepted == 2
    again.close()


# What a broken replica (or something else on its port) may send back to a call, each on a real socket.
GARBAGE = {
    "bytes that are not msgpack": lambda call_id: frame(b"\xc1\xc1 not msgpack"),
    "a reply of the wrong shape": lambda call_id: frame(msgspec.msgpack.encode({"call": call_id})),
    "a result of the wrong type": lambda call_id: frame(msgspec.msgpack.encode((call_id, None, {"outputs": 7}))),
    "a frame longer than the limit": lambda call_id: (MAX_FRAME + 1).to_bytes(4, "little"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
async def test_a_replica_that_answers_garbage_fails_the_calls_in_flight_and_is_dropped(garbage) -> None:
    """A replica that answers a call with bytes the caller cannot read: that call and every other one in flight
    on the connection fail at once with DataPlaneLost (which the expert client treats like a dead replica:
    re-open elsewhere), nothing is handed to the caller as a result, and the connection is marked lost."""
    answered = asyncio.Event()

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)                                     # the token
        await read_frame(reader)                                     # one call is never answered
        call_id = msgspec.msgpack.decode(await read_frame(reader))[0]
        writer.write(GARBAGE[garbage](call_id))
        answered.set()
        await reader.read()                                          # until the caller hangs up

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await DataPlaneConnection.open(Endpoint("127.0.0.1", port, "t"), "test")
    poll = asyncio.ensure_future(conn.call("poll", "caller", [], 1.0))
    with pytest.raises(DataPlaneLost):
        await asyncio.wait_for(conn.call("advance", [SessionStep("s", (1,))], 1), 5)
    with pytest.raises(DataPlaneLost):
        await asyncio.wait_for(poll, 5)
    assert answered.is_set() and conn.lost
    with pytest.raises(DataPlaneLost):
        await conn.call("advance", [SessionStep("s", (1,))], 1)
    server.close()


async def test_a_reply_the_caller_cannot_handle_fails_the_connection_instead_of_hanging_its_calls() -> None:
    """A watch whose on_item raises (the caller could not take a pushed item): the connection fails, so a call
    in flight on it ends with DataPlaneLost now, not at its timeout, and the watch hears why it ended."""
    replica = Replica()
    ended: list[Exception] = []

    async def watch(caller: str, emit) -> None:
        emit(PollReply("r1", ()))
        await asyncio.Event().wait()

    server = DataPlaneServer({"advance": replica.advance, "poll": replica.poll, "watch": watch}, "127.0.0.1")
    endpoint = await server.start()
    conn = await DataPlaneConnection.open(endpoint, "test")
    poll = asyncio.ensure_future(conn.call("poll", "caller", [], 1.0))             # held by the replica
    await asyncio.wait_for(conn.call("advance", [SessionStep("s", (1,))], 1), 5)    # connected and served

    def on_item(item) -> None:
        raise KeyError("a generation this caller does not know")

    conn.watch("watch", "caller", on_item=on_item, on_end=ended.append)
    with pytest.raises(DataPlaneLost, match="reply not handled"):
        await asyncio.wait_for(poll, 5)
    assert conn.lost and len(ended) == 1 and isinstance(ended[0], DataPlaneLost)
    await server.close()


async def test_a_caller_that_sends_garbage_is_dropped_and_the_replica_serves_the_others(served) -> None:
    """After a valid token, a frame that is not a request: the replica closes that connection (the socket sees
    end of file) without answering, serves nothing for it, and keeps serving every other connection."""
    _, server, endpoint = served
    good = await DataPlaneConnection.open(endpoint, "good")
    assert (await asyncio.wait_for(good.call("advance", [SessionStep("s", (1,))], 1), 5)).replica == "r1"
    served_before = server.calls_served
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write(frame(endpoint.token.encode()) + frame(b"\xc1 not a request"))
    assert await asyncio.wait_for(reader.read(), 5) == b""                       # closed, nothing answered
    writer.close()
    assert server.calls_served == served_before
    assert (await asyncio.wait_for(good.call("advance", [SessionStep("t", (1,))], 1), 5)).outputs[0].session_id == "t"
    good.close()


class DirectReplica(FakeHandle):
    """A fake Serve handle whose replica also has a real data plane; counts calls that came through Serve."""

    def __init__(self, endpoint: Endpoint | None, replica: Replica) -> None:
        self.endpoint_ = endpoint
        self.replica = replica
        self.through_serve: list[str] = []

    async def _endpoint(self, replica=None):
        self.through_serve.append("endpoint")
        return self.endpoint_

    async def _open(self, steps, top_k, replica=None):
        self.through_serve.append("open")
        return await self.replica.advance(steps, top_k)

    async def _advance(self, steps, top_k, replica=None):
        self.through_serve.append("advance")
        return await self.replica.advance(steps, top_k)


async def test_client_sends_pinned_steps_over_the_data_plane_and_reconnects_after_a_cut(served) -> None:
    replica, server, endpoint = served
    handle = DirectReplica(endpoint, replica)
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    [opened] = await client.open([SessionStep("s1", (1, 2))], 2)
    assert opened.replica == "r1" and opened.error is None
    for _ in range(3):
        [out] = await client.advance([SessionStep("s1", (3,))], 2)
        assert out.error is None and out.topk.token_ids == (5, 6)
    assert handle.through_serve == ["open", "endpoint"] and server.calls_served == 3
    server.cut()
    await asyncio.wait_for(client._conns["r1"]._task, 5)    # the client's reader has seen the reset
    assert client._conns["r1"].lost
    [out] = await client.advance([SessionStep("s1", (4,))], 2)
    assert out.error is None                                 # reconnected through a fresh endpoint
    assert handle.through_serve == ["open", "endpoint", "endpoint"] and server.connections_accepted == 2
    await client.aclose()


async def test_client_opens_sessions_over_the_data_plane_once_it_knows_a_replica(served) -> None:
    """New sessions go to a replica this client reaches directly; one open every rediscover_s, any open while
    it knows none, and any after its replica's connection was lost, is placed by Serve's router instead."""
    replica, server, endpoint = served
    handle = DirectReplica(endpoint, replica)
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    client.rediscover_s = 3600.0
    await client.open([SessionStep("s1", (1, 2))], 2)                   # knows no replica yet: Serve places it
    await client.advance([SessionStep("s1", (3,))], 2)                  # connects
    assert handle.through_serve == ["open", "endpoint"]
    for i in range(2, 5):
        [out] = await client.open([SessionStep(f"s{i}", (1, 2))], 2)
        assert out.error is None and out.replica == "r1"
    assert handle.through_serve == ["open", "endpoint"] and replica.opened == ["s2", "s3", "s4"]
    assert client.pinned_replicas() == {"r1": 4}
    client.rediscover_s = 0.0                                           # time to let Serve place one again
    await client.open([SessionStep("s5", (1, 2))], 2)
    assert handle.through_serve == ["open", "endpoint", "open"]
    client.rediscover_s = 3600.0
    server.cut()
    await asyncio.wait_for(client._conns["r1"]._task, 5)
    await client.open([SessionStep("s6", (1, 2))], 2)                   # its connection is lost: Serve again
    assert handle.through_serve == ["open", "endpoint", "open", "open"] and "s6" not in replica.opened
    await client.aclose()


async def test_client_places_no_new_session_on_a_quarantined_replica_until_its_quarantine_ends(served) -> None:
    """A replica that answered unsoundly is quarantined by the decode loop: this client's new sessions then go
    wherever Serve's router sends them (another replica, when there is one), not to it, until the time is up."""
    replica, _server, endpoint = served
    handle = DirectReplica(endpoint, replica)
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    client.rediscover_s = 3600.0
    await client.open([SessionStep("s1", (1, 2))], 2)
    await client.advance([SessionStep("s1", (3,))], 2)                  # connects: r1 is reachable directly
    await client.open([SessionStep("s2", (1, 2))], 2)
    assert handle.through_serve == ["open", "endpoint"]                 # placed on r1 directly
    client.quarantine("r1")
    await client.open([SessionStep("s3", (1, 2))], 2)
    assert handle.through_serve == ["open", "endpoint", "open"]         # not placed on r1 by this client
    [out] = await client.advance([SessionStep("s2", (3,))], 2)
    assert out.error is None                                            # its open sessions stay pinned to it
    client.quarantine("r1", for_s=0.0)                                  # the time is up
    await client.open([SessionStep("s4", (1, 2))], 2)
    assert handle.through_serve == ["open", "endpoint", "open"] and replica.opened[-1] == "s4"
    # With a sibling running, Serve's router (which knows nothing of the quarantine) is not asked at all: the
    # sibling is picked, though this client has no connection to it yet, rediscovery due or not.
    client._running = lambda: frozenset({"r1", "r2"})
    client.quarantine("r1")
    assert client._placement({"r1": 3}) == "r2"
    client.rediscover_s = 0.0
    assert client._placement({"r1": 3}) == "r2"
    client.quarantine("r2")
    assert client._placement({}) is None                                 # every replica in quarantine: Serve's router
    client._running = lambda: frozenset({"r2"})                          # Serve replaced r1: no longer counted
    assert client.quarantined_replicas() == ["r2"]
    client._running = lambda: frozenset({"r1", "r2", "r3"})              # (its time was kept, had the view lagged)
    assert client.quarantined_replicas() == ["r1", "r2"]
    client._streams["g1"] = ("r3", asyncio.Queue())                       # a native generation running on r3 ...
    client.quarantine_generation("g1")                                   # ... sent an unsound delta
    assert client.quarantined_replicas() == ["r1", "r2", "r3"]
    client._streams.pop("g1")
    # The counter (ensemble_expert_quarantines_total) counts each replica put into quarantine, r1 twice (its first
    # time was up), and keeps what the gauge drops when Serve replaces a replica; a renewal while held is not new.
    assert client.quarantines == 4
    client.quarantine("r2")
    assert client.quarantines == 4
    await client.aclose()


class GeneratingReplica:
    """A replica's native generations: `start` takes them, each finishes with one token, pushed over the
    caller's watch (or handed to its next poll when it has none yet)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._emit: dict[str, Callable] = {}
        self._pending: dict[str, list[GenerateDelta]] = {}

    async def start(self, requests: list[GenerateRequest], caller: str) -> StartReply:
        self.started += [r.request_id for r in requests]
        for r in requests:
            self._push(caller, GenerateDelta(r.request_id, token_ids=(3,), logprobs=(-0.1,), finish_reason="length"))
        return StartReply("r1", tuple(None for _ in requests))

    def _push(self, caller: str, delta: GenerateDelta) -> None:
        if caller in self._emit:
            self._emit[caller](PollReply("r1", (delta,)))
        else:
            self._pending.setdefault(caller, []).append(delta)

    async def watch(self, caller: str, emit: Callable) -> None:
        self._emit[caller] = emit
        for delta in self._pending.pop(caller, []):
            emit(PollReply("r1", (delta,)))
        await asyncio.Event().wait()

    async def poll(self, caller: str, aborts: list[str], wait_s: float) -> PollReply:
        return PollReply("r1", tuple(self._pending.pop(caller, [])))


class GeneratingHandle(DirectReplica):
    """DirectReplica over a GeneratingReplica: starts through Serve are counted too."""

    async def _start(self, requests, caller, replica=None):
        self.through_serve.append("start")
        return await self.replica.start(requests, caller)


async def test_client_starts_generations_over_the_data_plane_once_it_knows_a_replica() -> None:
    """A native generation's start goes to a replica this client reaches directly, like a session's open: the
    first (it knows no replica) and one every rediscover_s go through Serve's router, the others straight to
    the replica; every generation gets its tokens either way."""
    replica = GeneratingReplica()
    server = DataPlaneServer({"start": replica.start, "poll": replica.poll, "watch": replica.watch}, "127.0.0.1")
    handle = GeneratingHandle(await server.start(), replica)
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    client.rediscover_s = 3600.0

    async def generate(rid: str) -> list[GenerateDelta]:
        return await asyncio.wait_for(_collect(client.generate(GenerateRequest(rid, (1, 2), 1))), 5)

    assert [d.token_ids for d in await generate("g1")] == [(3,)]       # through Serve; then connects
    assert handle.through_serve == ["start", "endpoint"]
    for rid in ("g2", "g3"):
        assert [d.finish_reason for d in await generate(rid)] == ["length"]
    assert handle.through_serve == ["start", "endpoint"] and replica.started == ["g1", "g2", "g3"]
    client.rediscover_s = 0.0
    await generate("g4")
    assert handle.through_serve == ["start", "endpoint", "start"]
    await client.aclose()
    await server.close()


async def _collect(stream) -> list:
    return [d async for d in stream]


class TwoReplicas(FakeHandle):
    """A fake Serve handle over two replicas with real data planes; its router places opens in turn."""

    deployment_id = DeploymentID(name="expert-code", app_name="two-replicas-test")

    def __init__(self, served: dict[str, tuple[Replica, Endpoint]]) -> None:
        self.served = served
        self.turn = 0
        self.routed_opens = 0

    async def _endpoint(self, replica=None):
        return self.served[replica][1]

    async def _open(self, steps, top_k, replica=None):
        self.routed_opens += 1
        name = sorted(self.served)[self.turn % 2]
        self.turn += 1
        return await self.served[name][0].advance(steps, top_k)


async def test_client_places_new_sessions_on_the_known_replica_holding_fewest() -> None:
    replicas = {name: Replica(name) for name in ("ra", "rb")}
    servers = {name: DataPlaneServer({"open": r.open, "advance": r.advance, "poll": r.poll, "close": r.close},
                                     "127.0.0.1") for name, r in replicas.items()}
    handle = TwoReplicas({name: (replicas[name], await servers[name].start()) for name in replicas})
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    client.rediscover_s = 0.0
    for sid in ("a", "b"):                                   # Serve places one on each; the advances connect
        [opened] = await client.open([SessionStep(sid, (1, 2))], 2)
        assert opened.error is None
        await client.advance([SessionStep(sid, (3,))], 2)
    assert client.pinned_replicas() == {"ra": 1, "rb": 1} and handle.routed_opens == 2
    client.rediscover_s = 3600.0
    await client.open([SessionStep("c", (1, 2)), SessionStep("d", (1, 2))], 2)       # one call: one replica
    for sid in ("e", "f", "g", "h"):
        await client.open([SessionStep(sid, (1, 2))], 2)
    assert handle.routed_opens == 2                          # all six over the data planes
    assert client.pinned_replicas() == {"ra": 4, "rb": 4}, client.pinned_replicas()
    assert sorted(replicas["ra"].opened + replicas["rb"].opened) == ["c", "d", "e", "f", "g", "h"]
    await client.close(["c", "d", "e"])                      # c and d were opened together, e elsewhere
    held = client.pinned_replicas()
    assert sorted(held.values()) == [2, 3]
    await client.open([SessionStep("i", (1, 2))], 2)
    assert replicas[min(held, key=held.get)].opened[-1] == "i"
    RUNNING[("two-replicas-test", "expert-code")] = frozenset({"rb"})   # Serve is stopping "ra"
    try:
        await client.open([SessionStep("j", (1, 2)), SessionStep("k", (1, 2))], 2)
        await client.open([SessionStep("l", (1, 2))], 2)
        assert "j" in replicas["rb"].opened and "l" in replicas["rb"].opened
        assert handle.routed_opens == 2
    finally:
        RUNNING.pop(("two-replicas-test", "expert-code"))
    await client.aclose()
    for server in servers.values():
        await server.close()


async def test_client_uses_serve_when_the_replica_has_no_data_plane() -> None:
    handle = DirectReplica(None, Replica())
    client = ServeExpertClient(handle, "code", call_timeout_s=5)
    await client.open([SessionStep("s1", (1, 2))], 2)
    await client.advance([SessionStep("s1", (3,))], 2)
    await client.advance([SessionStep("s1", (4,))], 2)
    assert handle.through_serve == ["open", "endpoint", "advance", "advance"]
    await client.aclose()


async def test_concurrent_starts_listen_once(served) -> None:
    _, server, endpoint = served
    again = await asyncio.gather(*(server.start() for _ in range(5)))
    assert {e.port for e in again} == {endpoint.port}
    fresh = DataPlaneServer({"close": Replica().close}, "127.0.0.1")
    ends = await asyncio.gather(*(fresh.start() for _ in range(5)))
    assert len({e.port for e in ends}) == 1
    await fresh.close()
