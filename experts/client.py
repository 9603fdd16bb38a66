"""The Expert protocol over every replica of one expert deployment, from outside it (a Serve handle).

Sessions are pinned: every step after a session's `open` carries `replica=`, which experts/replica_router.py
routes to the replica holding its KV cache (or goes over that replica's data plane). An `open` goes to the
replica this client holds the fewest sessions on among those it has a live data-plane connection to, over
that connection, except one open every `rediscover_s` (and any open while it knows no replica): that one goes
wherever Serve's router sends it, by load, which is how replicas added later come into use. A native
generation's `start` is placed the same way, by this client's generations per replica. A batch of
advances is split by replica: one call per replica, all at once. Native generations are
multiplexed: the replica pushes the new tokens of every stream this client runs there, one message per
engine step, over a `watch` on its data plane (or, without one, one `poll` in flight carries them).

Failures are per item, never exceptions: a call that times out or reaches a dead replica fails its steps
with error_kind "unavailable" and forgets their pins, so the caller can re-open them elsewhere. Sessions
given up on after a timeout may still be open on a replica that was only slow or stopped: they are closed
there in the background once it answers again (until it is gone, or its idle reaper has had them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from experts import running_replicas
from experts.data_plane import METHODS as DATA_PLANE_METHODS
from experts.data_plane import DataPlaneConnection, DataPlaneLost, Endpoint
from experts.protocol import (
    ExpertInfo,
    GenerateDelta,
    GenerateRequest,
    PollReply,
    ReplicaStats,
    ScoreOutput,
    SessionStep,
    StartReply,
    StepOutput,
    StepReply,
)
from experts.replica_router import PIN

log = logging.getLogger(__name__)
NO_DIRECT_S = 60.0      # after a failed direct connection, a replica's calls go through Serve this long
REDISCOVER_S = 5.0      # at least this often, new sessions are placed by Serve's router (it sees every replica)
QUARANTINE_S = 60.0     # a replica that answered unsoundly gets no new session of this client's for this long


class ServeExpertClient:
    """One expert deployment (all its replicas) as an Expert. One instance per calling process."""

    def __init__(self, handle: Any, name: str, *, call_timeout_s: float | None = None,
                 poll_wait_s: float = 1.0, stall_s: float = 120.0) -> None:
        self._handle = handle
        self.name = name
        deployment = getattr(handle, "deployment_id", None)
        self._deployment = (deployment.app_name, deployment.name) if deployment is not None else None
        self.call_timeout_s = call_timeout_s          # None: wait as long as the replica takes
        self.poll_wait_s = poll_wait_s
        # A native generation that receives nothing at all for this long is treated as lost (the caller then
        # restarts it elsewhere): a safety net, far above any step or queueing time seen in practice.
        self.stall_s = stall_s
        self.caller = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pins: dict[str, str] = {}                                   # session id -> replica
        self._streams: dict[str, tuple[str | None, asyncio.Queue]] = {}   # generation id -> (replica, deltas)
        self._aborts: dict[str, list[str]] = {}                           # replica -> generation ids
        self._pollers: dict[str, asyncio.Task] = {}
        self._wakes: dict[str, asyncio.Event] = {}                        # replica -> its poller has work
        self._watched: dict[str, DataPlaneConnection] = {}                # replica -> connection pushing deltas
        # Sessions given up on after a timeout, by replica (None: an open whose replica is unknown); a task per
        # replica retries their close until it answers or is gone.
        self.abandoned: dict[str | None, set[str]] = {}
        self._closers: dict[str | None, asyncio.Task] = {}
        self.abandon_retry_s = (2.0, 30.0, 600.0)     # first wait, longest wait, give up (the idle reaper's time)
        self._conns: dict[str, DataPlaneConnection] = {}                  # replica -> direct connection
        self._connecting: dict[str, asyncio.Lock] = {}
        self._no_direct: dict[str, float] = {}                            # replica -> loop time to retry direct
        self.rediscover_s = REDISCOVER_S
        self._quarantined: dict[str, float] = {}                          # replica -> loop time it is let back
        self.quarantines = 0                  # replicas put into quarantine so far (a running one renewed: not again)
        self._routed_at = float("-inf")                  # loop time of the last Serve-placed open or start

    def __repr__(self) -> str:
        return f"ServeExpertClient({self.name!r})"

    # ---- transport ------------------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any, replica: str | None = None, timeout_s: float | None = None,
                    bounded: bool = True) -> Any:
        """One call, pinned to `replica` when given, bounded by timeout_s (default: call_timeout_s).

        Pinned per-token calls take the replica's data plane when it has one (experts/data_plane.py), every
        other call a Serve handle."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        limit = timeout_s if bounded else None
        conn = (await self._direct(replica)
                if replica is not None and method in DATA_PLANE_METHODS else None)
        if conn is not None:
            answer, cancel = conn.call(method, *args), None
        else:
            response = getattr(self._handle, method).remote(*args, **({PIN: replica} if replica else {}))
            answer, cancel = _awaited(response), response.cancel
        if limit is None:
            return await answer
        try:
            async with asyncio.timeout(limit):     # no task of its own (wait_for's): the call is written now
                return await answer
        except TimeoutError:
            if cancel is not None:
                cancel()
            raise TimeoutError(f"expert {self.name}: {method} took longer than {limit:.1f} s") from None

    async def _direct(self, replica: str) -> DataPlaneConnection | None:
        """The data-plane connection to `replica`, (re)connected through the endpoint Serve hands out; None
        when the replica has none, or could not be reached directly lately (its calls then go through Serve).
        Raises what the pinned `endpoint` call raises when the replica is gone."""
        conn = self._conns.get(replica)
        if conn is not None and not conn.lost:
            return conn
        if replica in self._no_direct and asyncio.get_running_loop().time() < self._no_direct[replica]:
            return None
        async with self._connecting.setdefault(replica, asyncio.Lock()):
            conn = self._conns.get(replica)
            if conn is not None and not conn.lost:
                return conn
            endpoint: Endpoint | None = await self._call("endpoint", replica=replica)
            if endpoint is None:
                self._no_direct[replica] = float("inf")
                return None
            try:
                conn = await DataPlaneConnection.open(endpoint, f"expert {self.name} replica {replica}")
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("expert %s: replica %s's data plane at %s:%d is unreachable (%r); its calls go through "
                            "Serve for %.0f s", self.name, replica, endpoint.host, endpoint.port, exc, NO_DIRECT_S)
                self._no_direct[replica] = asyncio.get_running_loop().time() + NO_DIRECT_S
                return None
            self._conns[replica] = conn
            return conn

    # ---- protocol -------------------------------------------------------------------------------------

    async def info(self) -> ExpertInfo:
        """Unbounded: at startup the replicas may still be loading their engines."""
        return await self._call("info", bounded=False)

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """New sessions, on the replica `_placement` picks; the reply pins them there."""
        if not steps:
            return []
        outputs = await self._step_call("open", steps, top_k, replica=self._placement(self.pinned_replicas()))
        for out in outputs:
            if out.error is None:
                self._pins[out.session_id] = out.replica
        return outputs

    def _placement(self, held: dict[str, int]) -> str | None:
        """Where new sessions (or generations) go: the replica with the fewest of this client's (`held`) among
        those reachable over a live data-plane connection (a Serve-routed call costs several ms more, each
        time), or None (Serve's router picks by load) when none is, or when the last Serve-placed open or start
        is `rediscover_s` old. A replica that lost its connection, left sessions abandoned after a timeout, or
        that Serve no longer routes to (it is being stopped) is not picked. Nor is one in quarantine, and while
        one is, Serve's router (which does not know) is not asked either: a running replica outside quarantine
        is picked instead, connected to directly if need be."""
        now = asyncio.get_running_loop().time()
        running = self._running()
        quarantined = set(self.quarantined_replicas())
        live = [r for r, conn in self._conns.items()
                if not conn.lost and r not in self.abandoned and self._no_direct.get(r, 0.0) <= now
                and r not in quarantined and (running is None or r in running)]
        due = now - self._routed_at >= self.rediscover_s
        if quarantined and running is not None and (due or not live):
            sound = [r for r in running if r not in quarantined and r not in self.abandoned]
            if sound:
                if due:
                    self._routed_at = now
                return min(sound, key=lambda r: held.get(r, 0))
        if not live or due:
            self._routed_at = now
            return None
        return min(live, key=lambda r: held.get(r, 0))

    def quarantine_generation(self, request_id: str) -> None:
        """The replica running generation `request_id` sent a delta no model could have sent: quarantine it, so
        that the restart goes elsewhere (orchestrator/native.py)."""
        replica = self._streams.get(request_id, (None, None))[0]
        if replica is not None:
            self.quarantine(replica)

    def quarantined_replicas(self) -> list[str]:
        """Replicas in quarantine now (placement, /metrics); those whose time is up are forgotten. One that Serve
        no longer runs (replaced, stopped) is left out: it takes nothing new anyway, and /metrics would count a
        dead replica for the rest of its time (kept, in case this router's view of Serve lags)."""
        now = asyncio.get_running_loop().time()
        self._quarantined = {r: until for r, until in self._quarantined.items() if until > now}
        running = self._running()
        return sorted(r for r in self._quarantined if running is None or r in running)

    def quarantine(self, replica: str, for_s: float = QUARANTINE_S) -> None:
        """`replica` answered unsoundly (experts/answer_checks.py): place no new session or generation on it for
        `for_s`, so that the sessions re-opened after its bad answers go to a sound sibling (a corrupt replica
        among sound ones) instead of back to it, which holds the fewest sessions now. The sessions it still
        holds stay pinned to it until they fail too. With no other replica running, Serve's router places them
        (on it: the expert is then marked down, as with one replica)."""
        now = asyncio.get_running_loop().time()
        if self._quarantined.get(replica, 0.0) <= now:
            log.warning("expert %s: replica %s answered unsoundly; no new session goes there for %.0f s",
                        self.name, replica, for_s)
            self.quarantines += 1
        self._quarantined[replica] = now + for_s

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """One pinned call per replica, concurrently; outputs in the order of `steps`."""
        groups: dict[str | None, list[int]] = {}
        for i, step in enumerate(steps):
            groups.setdefault(self._pins.get(step.session_id), []).append(i)
        calls = [self._step_call("advance", [steps[i] for i in idx], top_k, replica=replica)
                 for replica, idx in groups.items()]
        results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)   # one: inline
        outputs: list[StepOutput | None] = [None] * len(steps)
        for idx, outs in zip(groups.values(), results):
            for i, out in zip(idx, outs):
                outputs[i] = out
                if out.error is not None and out.error_kind != "input":
                    self._pins.pop(out.session_id, None)      # the session is gone (closed, or its replica)
        return outputs  # type: ignore[return-value]

    async def close(self, session_ids: list[str]) -> None:
        groups: dict[str | None, list[str]] = {}
        for sid in session_ids:
            groups.setdefault(self._pins.pop(sid, None), []).append(sid)
        results = await asyncio.gather(*(self._call("close", ids, replica=replica) for replica, ids in groups.items()),
                                       return_exceptions=True)
        for (replica, ids), r in zip(groups.items(), results):
            if isinstance(r, TimeoutError):
                self._abandon(replica, ids)                 # slow or stopped: close them when it answers
            elif isinstance(r, BaseException):
                log.warning("expert %s: close failed: %r", self.name, r)   # its replica is gone: so are they

    def _abandon(self, replica: str | None, session_ids: list[str]) -> None:
        self.abandoned.setdefault(replica, set()).update(session_ids)
        task = self._closers.get(replica)
        if task is None or task.done():
            self._closers[replica] = asyncio.get_running_loop().create_task(self._close_abandoned(replica))

    async def _close_abandoned(self, replica: str | None) -> None:
        """Retry the close of `replica`'s abandoned sessions with backoff until it answers, is gone (any other
        error: ReplicaGone, a dead actor) or the idle reaper's time has passed."""
        wait, longest, give_up = self.abandon_retry_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up
        while self.abandoned.get(replica):
            await asyncio.sleep(wait)
            ids = sorted(self.abandoned[replica])
            try:
                await self._call("close", ids, replica=replica)
            except TimeoutError:
                if loop.time() < deadline:
                    wait = min(2 * wait, longest)
                    continue
                log.warning("expert %s: replica %s never answered; its idle reaper closes %d sessions",
                            self.name, replica, len(ids))
            except Exception as exc:  # noqa: BLE001 - the replica is gone, and its sessions with it
                log.info("expert %s: abandoned sessions of replica %s went with it (%r)", self.name, replica, exc)
            else:
                log.info("expert %s: closed %d sessions abandoned on replica %s", self.name, len(ids), replica)
            remaining = self.abandoned.get(replica, set()) - set(ids)
            if remaining:
                self.abandoned[replica] = remaining
            else:
                self.abandoned.pop(replica, None)

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        return await self._call("score", sequences, top_k, bounded=False)   # offline jobs: long batches

    async def stats(self) -> ReplicaStats:
        return await self._call("stats")

    async def num_open_sessions(self) -> int:
        return await self._call("num_open_sessions")

    def routable_replicas(self) -> int | None:
        """Replicas Serve routes this expert's calls to now, as this process's router last heard (None: not
        heard yet). New sessions are placed only on those (for /metrics)."""
        running = self._running()
        return None if running is None else len(running)

    def _running(self) -> frozenset[str] | None:
        return running_replicas.running(*self._deployment) if self._deployment is not None else None

    def generations_by_replica(self) -> dict[str, int]:
        """Native generations of this client running per replica (a starting one has none yet)."""
        return dict(Counter(replica for replica, _ in self._streams.values() if replica is not None))

    def pinned_replicas(self) -> dict[str, int]:
        """Open sessions of this client per replica (for /metrics)."""
        return dict(Counter(self._pins.values()))

    async def _step_call(self, method: str, steps: list[SessionStep], top_k: int, replica: str | None) -> list[StepOutput]:
        try:
            reply: StepReply = await self._call(method, steps, top_k, replica=replica)
        except Exception as exc:  # noqa: BLE001 - a dead or hung replica fails its items, not the caller
            why = f"expert {self.name} unavailable ({type(exc).__name__}: {exc})"
            for step in steps:
                self._pins.pop(step.session_id, None)
            if isinstance(exc, (TimeoutError, DataPlaneLost)):   # it may live on: its sessions could be open
                self._abandon(replica, [step.session_id for step in steps])
            return [StepOutput(s.session_id, error=why, error_kind="unavailable") for s in steps]
        return [StepOutput(o.session_id, o.topk, o.error, o.error_kind, o.length, reply.replica, reply.server_s)
                for o in reply.outputs]

    # ---- native generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Start on the replica `_placement` picks (over its data plane) or Serve picks, then receive the deltas
        through that replica's poller."""
        rid = request.request_id
        queue: asyncio.Queue[GenerateDelta] = asyncio.Queue()
        # Registered before the start call: a poll already in flight on that replica may bring this request's
        # first deltas back before `start` itself returns; they must find their queue, not be dropped.
        self._streams[rid] = (None, queue)
        placed = self._placement(self.generations_by_replica())
        try:
            reply: StartReply = await self._call("start", [request], self.caller, replica=placed)
        except Exception as exc:  # noqa: BLE001
            self._streams.pop(rid, None)
            if placed is not None and isinstance(exc, (TimeoutError, DataPlaneLost)):
                self._aborts.setdefault(placed, []).append(rid)    # it may have started there: end it
                self._ensure_poller(placed)
            yield GenerateDelta(rid, error=f"expert {self.name} unavailable ({type(exc).__name__}: {exc})",
                                error_kind="unavailable")
            return
        except BaseException:             # cancelled while starting: the replica's lease reaper ends it
            self._streams.pop(rid, None)
            raise
        if reply.errors[0] is not None:
            self._streams.pop(rid, None)
            message, kind = reply.errors[0]
            yield GenerateDelta(rid, error=message, error_kind=kind)
            return
        self._streams[rid] = (reply.replica, queue)
        self._ensure_poller(reply.replica)
        finished = False
        try:
            while True:
                if queue.empty():
                    try:
                        async with asyncio.timeout(self.stall_s):     # a timer, not a task per token
                            delta = await queue.get()
                    except TimeoutError:     # nothing at all for stall_s: treat the replica as lost
                        delta = GenerateDelta(rid, error=f"expert {self.name}: no token for {self.stall_s:.0f} s "
                                              f"on replica {reply.replica}", error_kind="unavailable")
                else:
                    delta = queue.get_nowait()
                finished = delta.final
                yield delta
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:                    # the consumer stopped early: abort it on the replica
                self._aborts.setdefault(reply.replica, []).append(rid)
                self._ensure_poller(reply.replica)
                self._wake(reply.replica)

    def _ensure_poller(self, replica: str) -> None:
        task = self._pollers.get(replica)
        if task is None or task.done():
            self._pollers[replica] = asyncio.get_running_loop().create_task(
                self._poll_loop(replica), name=f"poll:{self.name}:{replica}")

    def _wake(self, replica: str) -> None:
        event = self._wakes.get(replica)
        if event is not None:
            event.set()

    async def _poll_loop(self, replica: str) -> None:
        """While this client has streams (or aborts) on `replica`, get their deltas to their queues.

        Over the replica's data plane the deltas are pushed (`watch`, once per connection); this loop then
        only sends a `poll` with no wait every `poll_wait_s`, which keeps this caller's lease on the replica
        and notices a hung one (the call times out), and at once when there are aborts to carry. Without a
        data plane one long `poll` is in flight at a time and carries the deltas itself."""
        aborting = False
        wake = self._wakes.setdefault(replica, asyncio.Event())
        while True:
            wake.clear()
            aborts = self._aborts.pop(replica, [])
            active = [rid for rid, (r, _) in self._streams.items() if r == replica]
            if not active and not aborts:
                break
            timeout = self.poll_wait_s + (self.call_timeout_s or 60.0)
            try:
                pushed = await self._watch(replica) if active else self._watched.get(replica)
                wait_s = self.poll_wait_s if active and pushed is None else 0.0
                reply: PollReply = await self._call("poll", self.caller, aborts, wait_s,
                                                    replica=replica, timeout_s=timeout)
            except Exception as exc:  # noqa: BLE001 - the replica is gone: every stream on it ends here
                why = f"expert {self.name} unavailable ({type(exc).__name__}: {exc})"
                lost = []
                for rid, (r, queue) in list(self._streams.items()):
                    if r == replica:
                        queue.put_nowait(GenerateDelta(rid, error=why, error_kind="unavailable"))
                        lost.append(rid)
                if isinstance(exc, DataPlaneLost) and lost and not aborting:
                    aborting = True           # the replica may live on: abort them there (one more poll)
                    self._aborts.setdefault(replica, []).extend(lost)
                    continue
                break
            aborting = False
            self._deliver(reply)
            if pushed is not None and not wake.is_set():     # deltas come pushed: wait for work or a heartbeat
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_wait_s):
                        await wake.wait()
        self._pollers.pop(replica, None)

    async def _watch(self, replica: str) -> DataPlaneConnection | None:
        """The data-plane connection that pushes `replica`'s deltas to this client (a watch started on it
        now if not yet), or None when its calls go through Serve. Raises DataPlaneLost when the connection
        that was pushing went: deltas may have gone with it."""
        watched = self._watched.get(replica)
        if watched is not None:
            if not watched.lost:
                return watched
            del self._watched[replica]
            raise DataPlaneLost(f"{watched.name}: the connection pushing its deltas was lost")
        conn = await self._direct(replica)
        if conn is None:
            return None

        def ended(exc: Exception) -> None:      # the connection went, or the replica ended the watch
            if self._watched.get(replica) is conn and (
                    not conn.lost or not any(r == replica for r, _ in self._streams.values())):
                del self._watched[replica]      # nothing was lost: the replica's outbox keeps the next deltas
            self._wake(replica)

        conn.watch("watch", self.caller, on_item=self._deliver, on_end=ended)
        self._watched[replica] = conn
        return conn

    def _deliver(self, reply: PollReply) -> None:
        for delta in reply.deltas:
            entry = self._streams.get(delta.request_id)
            if entry is not None:
                entry[1].put_nowait(delta)

    async def aclose(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        tasks = [*self._pollers.values(), *self._closers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _awaited(response: Any) -> Any:
    return await response
