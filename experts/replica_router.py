"""Serve request routing for expert deployments: a session's steps go to the replica that holds its KV cache.

A call made with the keyword `replica=<unique id>` is routed to that replica and nowhere else; if it is gone
(dead, or removed by Serve), the call fails at once with ReplicaGone instead of waiting for it forever, so
the orchestrator can re-open the session elsewhere (migration), and its routing task ends (it must never
spin: Serve's routing loop runs on the caller's event loop, which also runs the decode loop and the HTTP
server; tests/unit/test_replica_router.py). Calls without `replica=` (generations, scoring, and the new
sessions the client lets Serve place) use Serve's default power-of-two-choices by load. Each replica-set
update Serve makes is also published to experts/running_replicas.py, where the client looks before it places
new sessions itself. Configured per expert deployment through `request_router_config` (experts/config.py:
serve_options).
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from experts import running_replicas

PIN = "replica"      # the keyword argument that pins a call


class ReplicaGone(RuntimeError):
    """The replica a call was pinned to is no longer serving."""


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's replica set changed: also tell this process's expert clients (new-session placement)."""
        super().update_replicas(replicas)
        running_replicas.publish(self._deployment_id.app_name, self._deployment_id.name,
                                 frozenset(r.replica_id.unique_id for r in replicas))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pinned = pending_request.kwargs.get(PIN) if pending_request is not None else None
        if pinned is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # Serve's routing loop asks again at once, without awaiting anything, unless told to back off: a
        # pinned replica that stays busy (or a request already failed below) must not spin the event loop.
        pending_request.routing_context.should_backoff = True
        for replica in candidate_replicas:
            if replica.replica_id.unique_id == pinned:
                return [[replica]]
        if not pending_request.future.done():
            pending_request.future.set_exception(ReplicaGone(f"replica {pinned} of {self._deployment_id.name} is gone"))
        # The loop ends a request's routing once its future is done, but it looks only when it is handed some
        # candidates (an empty answer means "ask again"); these are never tried.
        return [candidate_replicas]


ROUTER_PATH = f"{__name__}:{SessionAffinityRouter.__name__}"
