"""Serve request routing for expert deployments: a session's steps go to the replica that holds its KV cache.

A call made with the keyword `replica=<unique id>` is routed to that replica and nowhere else; if it is gone
(dead, or removed by Serve), the call fails at once with ReplicaGone instead of waiting for it forever, so
the orchestrator can re-open the session elsewhere (migration). Calls without `replica=` (new sessions,
generations, scoring) use Serve's default power-of-two-choices by load. Configured per expert deployment
through `request_router_config` (experts/config.py: serve_options).
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

PIN = "replica"      # the keyword argument that pins a call


class ReplicaGone(RuntimeError):
    """The replica a call was pinned to is no longer serving."""


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pinned = pending_request.kwargs.get(PIN) if pending_request is not None else None
        if pinned is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        for replica in candidate_replicas:
            if replica.replica_id.unique_id == pinned:
                return [[replica]]
        if not pending_request.future.done():
            pending_request.future.set_exception(ReplicaGone(f"replica {pinned} of {self._deployment_id.name} is gone"))
        return []


ROUTER_PATH = f"{__name__}:{SessionAffinityRouter.__name__}"
