"""The replicas of a running application's deployments, as Serve's controller reports them.

Used to confirm something on every replica (a gate swap reaches every gateway replica), to tell operators
where replicas run, and by the fault and cluster tests to find the real process behind a replica.
Each call that must reach one given replica passes `replica=<replica_id>`: the session-affinity router
(experts/replica_router.py, used by the experts and the gateway) sends it there and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaInfo:
    deployment: str
    replica_id: str          # Serve's unique id: what `replica=` pins to
    state: str               # RUNNING, STARTING, STOPPING, ...
    pid: int | None
    node_id: str | None
    node_ip: str | None


def replicas(app: str, deployment: str, *, running_only: bool = True) -> list[ReplicaInfo]:
    """The replicas of `deployment` in application `app` (needs a connected Ray with Serve running)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    dep = ((details.get("applications") or {}).get(app) or {}).get("deployments", {}).get(deployment)
    if dep is None:
        return []
    out = [ReplicaInfo(deployment, r["replica_id"], str(getattr(r["state"], "value", r["state"])), r.get("pid"),
                       r.get("node_id"), r.get("node_ip"))
           for r in dep.get("replicas", [])]
    return [r for r in out if r.state == "RUNNING"] if running_only else out
