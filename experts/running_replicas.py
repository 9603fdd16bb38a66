"""The replicas Serve routes to now, per expert deployment, as this process's request routers last heard.

Written by experts/replica_router.py (Serve calls its `update_replicas` whenever the controller changes the set:
a replica added, stopping or dead), read by experts/client.py to place new sessions. Kept in a module of its own
and reached as a module attribute: Serve hands the router class to each handle by value, with copies of the
router module's globals (seen: every router instance had a dict of its own), while a module is always passed by
reference.
"""

from __future__ import annotations

RUNNING: dict[tuple[str, str], frozenset[str]] = {}     # (app, deployment) -> replica unique ids


def publish(app: str, deployment: str, replica_ids: frozenset[str]) -> None:
    RUNNING[(app, deployment)] = replica_ids


def running(app: str, deployment: str) -> frozenset[str] | None:
    """None until a router of this process has heard of the deployment."""
    return RUNNING.get((app, deployment))
