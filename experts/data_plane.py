"""A direct TCP channel from a caller to one expert replica, for the calls made once per token.

Why: on the 2-core dev machine a Ray Serve handle call costs ≈ 4 ms round trip even to an idle replica doing
nothing (`scripts/measure_call_overhead.py`: 4.7 ms), about a whole session step of the engine, while the same
call over a plain asyncio socket costs ≈ 0.2 ms. Serve stays the control plane: it places replicas, routes
new sessions and generations by load, checks health and hands out each replica's endpoint. The per-token
calls pinned to a known replica (`advance`, `poll`, `close`, and `open` and `start` when the caller picks the
replica, experts/client.py) then go straight to it over this channel.

Wire format: frames of a 4-byte little-endian length and a msgpack body (msgspec, typed on both ends; no
pickle, so a stranger reaching the port cannot run code). A connection starts with one frame holding the
replica's token, which only the Serve control plane hands out (`ExpertServer.endpoint`). Then:
  request  = [call_id, method, [args...]]
  reply    = [call_id, error or None, result]
Calls on one connection run concurrently on the replica (a long `poll` does not hold up an `advance`).
A streaming call (`watch`) is answered by any number of replies under its call id, each an item, until the
connection goes (an error reply ends it early): the replica pushes the deltas of a caller's generations as
they come, with no request per token.
A lost connection fails every call in flight with `DataPlaneLost`; the caller treats those like a replica
that stopped answering (experts/client.py), and the next call reconnects through a fresh endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from experts.protocol import GenerateRequest, PollReply, SessionStep, StartReply, StepReply

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
MAX_FRAME = 64 << 20

# method -> (type of its positional args, type of its result), for both ends.
METHODS: dict[str, tuple[Any, Any]] = {
    "open": (tuple[list[SessionStep], int], StepReply),
    "advance": (tuple[list[SessionStep], int], StepReply),
    "poll": (tuple[str, list[str], float], PollReply),
    "close": (tuple[list[str]], None),
    "watch": (tuple[str], PollReply),
    "start": (tuple[list[GenerateRequest], str], StartReply),
}
# Streaming methods: the handler also gets `emit` (one reply frame per call) and returns when the stream ends.
STREAMS = frozenset({"watch"})


@dataclass(frozen=True)
class Endpoint:
    """Where a replica's data plane listens, and the token that opens it."""

    host: str
    port: int
    token: str


class DataPlaneLost(ConnectionError):
    """The connection to the replica broke: calls in flight have no answer (the replica may be gone)."""


class RemoteError(RuntimeError):
    """The replica raised while serving a data-plane call."""


_encoder = msgspec.msgpack.Encoder()
_request_head = msgspec.msgpack.Decoder(tuple[int, str, msgspec.Raw])
_reply_head = msgspec.msgpack.Decoder(tuple[int, str | None, msgspec.Raw])
_args = {m: msgspec.msgpack.Decoder(t) for m, (t, _) in METHODS.items()}
_results = {m: msgspec.msgpack.Decoder(r) for m, (_, r) in METHODS.items()}


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"data-plane frame of {n} bytes exceeds {MAX_FRAME}")
    return await reader.readexactly(n)


# ---- replica side ------------------------------------------------------------------------------------------

class DataPlaneServer:
    """Serves `handlers` (method -> async callable taking the decoded args) on host:<free port>.

    Start it from the event loop the handlers use (the replica's user-code loop)."""

    def __init__(self, handlers: dict[str, Callable[..., Awaitable[Any]]], host: str) -> None:
        unknown = set(handlers) - set(METHODS)
        assert not unknown, f"no wire types for {unknown}"
        self._handlers = handlers
        self._host = host
        self._token = secrets.token_hex(16)
        self._server: asyncio.base_events.Server | None = None
        self._starting = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections_accepted = 0
        self.calls_served = 0

    async def start(self) -> Endpoint:
        """Listen (once, however many callers ask at the same time); -> the endpoint."""
        async with self._starting:
            if self._server is None:
                self._server = await asyncio.start_server(self._serve, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return Endpoint(self._host, port, self._token)

    def cut(self) -> int:
        """Drop every open connection at once (TCP reset); returns how many. Callers reconnect."""
        writers, self._writers = self._writers, set()
        for w in writers:
            w.transport.abort()
        return len(writers)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(read_frame(reader), 10.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.transport.abort()
            return
        if not hmac.compare_digest(token, self._token.encode()):
            log.warning("data plane: refused a connection from %s (wrong token)", writer.get_extra_info("peername"))
            writer.transport.abort()
            return
        self.connections_accepted += 1
        self._writers.add(writer)
        polls: set[asyncio.Task] = set()       # polls and watches: calls that wait on the caller's deltas
        try:
            while True:
                call_id, method, raw = _request_head.decode(await read_frame(reader))
                task = asyncio.get_running_loop().create_task(self._call(writer, call_id, method, raw))
                if method == "poll" or method in STREAMS:
                    polls.add(task)
                    task.add_done_callback(polls.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, msgspec.DecodeError):
            pass                                  # the caller went away (or cut): its calls' answers have no reader
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            # A poll still waiting (or a watch) would take deltas out of its caller's outbox and drop them with
            # this connection, among them the first tokens of the generations the caller restarts after the loss.
            for task in polls:
                task.cancel()

    async def _call(self, writer: asyncio.StreamWriter, call_id: int, method: str, raw: msgspec.Raw) -> None:
        try:
            handler = self._handlers[method]
            if method in STREAMS:
                self.calls_served += 1

                def emit(item: Any) -> None:
                    if not writer.is_closing():
                        writer.write(frame(_encoder.encode((call_id, None, item))))

                await handler(*_args[method].decode(raw), emit=emit)
                reply = _encoder.encode((call_id, f"{method} ended", None))   # the caller hears it is over
            else:
                result = await handler(*_args[method].decode(raw))
                self.calls_served += 1
                reply = _encoder.encode((call_id, None, result))
        except Exception as exc:                  # a failed call is answered; the connection lives on
            log.exception("data plane: call %s failed", call_id)
            reply = _encoder.encode((call_id, f"{type(exc).__name__}: {exc}", None))
        if not writer.is_closing():
            writer.write(frame(reply))


# ---- caller side --------------------------------------------------------------------------------------------

class DataPlaneConnection:
    """One caller's connection to one replica; any number of concurrent calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self._reader = reader
        self._writer = writer
        self.name = name
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        # streaming calls: call id -> (method, on_item, on_end)
        self._watches: dict[int, tuple[str, Callable[[Any], None], Callable[[Exception], None]]] = {}
        self._next_id = 0
        self._lost: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._read(), name=f"data-plane:{name}")

    @classmethod
    async def open(cls, endpoint: Endpoint, name: str, timeout_s: float = 5.0) -> DataPlaneConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(endpoint.host, endpoint.port), timeout_s)
        writer.write(frame(endpoint.token.encode()))
        return cls(reader, writer, name)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    async def call(self, method: str, *args: Any) -> Any:
        if self._lost is not None:
            raise DataPlaneLost(f"{self.name}: {self._lost}")
        call_id = self._next_id
        self._next_id += 1
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (method, future)
        try:
            self._writer.write(frame(_encoder.encode((call_id, method, args))))
            return await future
        finally:
            self._pending.pop(call_id, None)

    def watch(self, method: str, *args: Any, on_item: Callable[[Any], None],
              on_end: Callable[[Exception], None]) -> None:
        """Start a streaming call: `on_item` gets each reply as it is read, `on_end` why the stream ended (the
        replica ended it: RemoteError; the connection went: DataPlaneLost). Both run on the reading task."""
        assert method in STREAMS, method
        if self._lost is not None:
            raise DataPlaneLost(f"{self.name}: {self._lost}")
        call_id = self._next_id
        self._next_id += 1
        self._watches[call_id] = (method, on_item, on_end)
        self._writer.write(frame(_encoder.encode((call_id, method, args))))

    def close(self) -> None:
        self._fail("closed by the caller")
        self._writer.transport.abort()
        self._task.cancel()

    async def _read(self) -> None:
        try:
            while True:
                call_id, error, raw = _reply_head.decode(await read_frame(self._reader))
                watch = self._watches.get(call_id)
                if watch is not None:
                    if error is not None:
                        del self._watches[call_id]
                        watch[2](RemoteError(error))
                    else:
                        watch[1](_results[watch[0]].decode(raw))
                    continue
                entry = self._pending.get(call_id)
                if entry is None:                # its caller timed out or was cancelled
                    continue
                method, future = entry
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(RemoteError(error))
                else:
                    future.set_result(_results[method].decode(raw))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, msgspec.DecodeError) as exc:
            self._fail(f"connection lost ({type(exc).__name__}: {exc})")     # malformed replies land here too
        except Exception as exc:
            # A reply that could not be handed over (a watch's on_item raised): the rest of this connection's
            # stream cannot be trusted, so every call on it fails now instead of waiting for an answer
            # that no reader would take.
            log.exception("data plane %s: a reply could not be handled", self.name)
            self._fail(f"reply not handled ({type(exc).__name__}: {exc})")
        finally:
            with contextlib.suppress(Exception):
                self._writer.transport.abort()

    def _fail(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(DataPlaneLost(f"{self.name}: {why}"))
        watches, self._watches = self._watches, {}
        for _, _, on_end in watches.values():
            on_end(DataPlaneLost(f"{self.name}: {self._lost}"))
