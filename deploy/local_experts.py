"""Start expert deployments on Ray Serve for offline jobs (gate training, evaluation, retraining).

Each expert becomes its own Serve application without an HTTP route; the caller gets Expert clients
and everything it started is torn down on exit. Joins a running Ray cluster if RAY_ADDRESS is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from experts.config import ExpertConfig
from experts.protocol import Expert

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """ray.init once; returns True if this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # Replicas ask for whole CPUs; on a 2-core machine Serve would never schedule 5 engines otherwise.
        ray.init(num_cpus=num_cpus or max(16, os.cpu_count() or 1), log_to_driver=False, include_dashboard=False)
    return True


@contextlib.asynccontextmanager
async def running_experts(configs: list[ExpertConfig], *, num_cpus: int | None = None) -> AsyncIterator[dict[str, Expert]]:
    from ray import serve

    from experts.server import run_experts

    started_ray = ensure_ray(num_cpus)
    apps = [c.deployment_name for c in configs]
    t0 = time.time()
    try:
        # One run_many call: every engine loads in parallel, and it returns once all are healthy.
        clients: dict[str, Expert] = await asyncio.to_thread(run_experts, configs)
        log.info("started %d experts in %.0f s", len(configs), time.time() - t0)
        yield clients
    finally:
        if not started_ray:                 # a shared cluster: remove only what we deployed
            for app in apps:
                with contextlib.suppress(Exception):
                    serve.delete(app)
        else:                               # our own local Ray: stopping it stops every engine at once
            import ray

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
