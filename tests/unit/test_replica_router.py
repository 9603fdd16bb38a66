"""The session-affinity router inside Serve's real routing loop (RequestRouter._choose_replica_for_request),
with Serve's own in-memory replica stand-in (ray.serve._private.test_utils.FakeRunningReplica).

Each case runs on an event loop of its own thread: a router that spins would block that loop forever, and
the test then fails on the thread's join timeout instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.test_utils import FakeRunningReplica
from ray.serve.request_router import PendingRequest

from experts.replica_router import PIN, ReplicaGone, SessionAffinityRouter
from experts.running_replicas import RUNNING

LOOP_DEADLINE_S = 20.0


def run_on_own_loop(case) -> None:
    """Run `case()` (a coroutine function) with asyncio.run in a daemon thread; fail if its loop never ends."""
    outcome: dict = {}

    def target() -> None:
        try:
            asyncio.run(case())
            outcome["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(LOOP_DEADLINE_S)
    assert not thread.is_alive(), "the router's event loop never finished: something spins without awaiting"
    if "error" in outcome:
        raise outcome["error"]


def router_with(*names: str) -> tuple[SessionAffinityRouter, dict[str, FakeRunningReplica]]:
    router = SessionAffinityRouter(deployment_id=DeploymentID(name="expert-code", app_name="app"),
                                   handle_source=DeploymentHandleSource.REPLICA)
    replicas = {name: FakeRunningReplica(name) for name in names}
    for replica in replicas.values():
        replica.set_queue_len_response(0)
    router.update_replicas(list(replicas.values()))
    return router, replicas


def request(n: int, **kwargs) -> PendingRequest:
    return PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}"))


async def routing_done(router: SessionAffinityRouter) -> None:
    """Every routing task of the router has ended (they are Serve's own tasks)."""
    tasks = list(router._routing_tasks)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=LOOP_DEADLINE_S / 2)
        assert not pending, f"{len(pending)} routing tasks still running"


def test_a_pinned_call_goes_to_its_replica_every_time() -> None:
    async def case() -> None:
        router, replicas = router_with("a", "b", "c")
        for n in range(12):
            chosen = await asyncio.wait_for(router._choose_replica_for_request(request(n, **{PIN: "b"})), 5)
            assert chosen is replicas["b"]
        await routing_done(router)

    run_on_own_loop(case)


def test_an_unpinned_call_goes_to_some_replica() -> None:
    async def case() -> None:
        router, replicas = router_with("a", "b")
        chosen = await asyncio.wait_for(router._choose_replica_for_request(request(0)), 5)
        assert chosen in replicas.values()
        await routing_done(router)

    run_on_own_loop(case)


def test_a_call_pinned_to_a_gone_replica_fails_at_once_and_its_routing_ends() -> None:
    async def case() -> None:
        router, _ = router_with("a", "b")
        with pytest.raises(ReplicaGone, match="replica gone-one of expert-code is gone"):
            await asyncio.wait_for(router._choose_replica_for_request(request(0, **{PIN: "gone-one"})), 5)
        await routing_done(router)
        # The router still serves: the loop was not left spinning on the failed request.
        chosen = await asyncio.wait_for(router._choose_replica_for_request(request(1, **{PIN: "a"})), 5)
        assert chosen.replica_id.unique_id == "a"

    run_on_own_loop(case)


def test_a_pinned_replica_that_disappears_while_a_call_waits_for_it_fails_that_call() -> None:
    async def case() -> None:
        router, replicas = router_with("a", "b")
        replicas["b"].set_queue_len_response(replicas["b"].max_ongoing_requests)    # full: the call waits
        waiting = asyncio.ensure_future(router._choose_replica_for_request(request(0, **{PIN: "b"})))
        while replicas["b"].num_get_queue_len_calls < 3:   # the router probed "b", found it full, backed off
            assert not waiting.done()
            await asyncio.sleep(0.01)
        assert not waiting.done()
        router.update_replicas([replicas["a"]])            # Serve removed "b" (it died)
        with pytest.raises(ReplicaGone):
            await asyncio.wait_for(waiting, 5)
        await routing_done(router)

    run_on_own_loop(case)


def test_the_replicas_serve_routes_to_are_published_for_new_session_placement() -> None:
    async def case() -> None:
        router, replicas = router_with("a", "b")
        assert RUNNING[("app", "expert-code")] == {"a", "b"}
        router.update_replicas([replicas["a"]])            # Serve stops routing to "b" (scale-down, death)
        assert RUNNING[("app", "expert-code")] == {"a"}

    run_on_own_loop(case)
