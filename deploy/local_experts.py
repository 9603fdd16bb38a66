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


class ServeLost(RuntimeError):
    """Ray or the Serve controller died under an offline job."""


class ServeWatchdog:
    """Checks every `period_s` that Serve's controller answers; when it has not for `grace_s`, cancels the
    job's task (which `running_experts` turns into ServeLost) instead of letting handle calls retry forever."""

    def __init__(self, task: asyncio.Task | None, period_s: float = 5.0, grace_s: float | None = None) -> None:
        # ENSEMBLE_SERVE_GRACE_S: how long an offline job waits for an unreachable Serve controller (default 60 s)
        grace_s = float(os.environ.get("ENSEMBLE_SERVE_GRACE_S", "60")) if grace_s is None else grace_s
        self.task, self.period_s, self.grace_s = task, period_s, grace_s
        self.check_timeout_s = min(30.0, max(1.0, grace_s))     # one check waits at most this long for an answer
        self.lost: str | None = None
        self._watch: asyncio.Task | None = None

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._run(), name="serve-watchdog")

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def _run(self) -> None:
        failing_since: float | None = None
        while True:
            await asyncio.sleep(self.period_s)
            error = await asyncio.to_thread(_controller_error, self.check_timeout_s)
            if error is None:
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= self.grace_s:
                self.lost = error
                log.error("Serve controller unreachable for %.0f s (%s): stopping the job", self.grace_s, error)
                if self.task is not None:
                    self.task.cancel()
                return


def _controller_error(timeout_s: float = 30.0) -> str | None:
    """None if Serve's controller answers within timeout_s, else what went wrong."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(controller.check_alive.remote(), timeout=timeout_s)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to reach it counts
        return f"{type(exc).__name__}: {str(exc)[:300]}"


@contextlib.asynccontextmanager
async def running_experts(configs: list[ExpertConfig], *, num_cpus: int | None = None) -> AsyncIterator[dict[str, Expert]]:
    from ray import serve

    from experts.server import run_experts

    started_ray = ensure_ray(num_cpus)
    apps = [c.deployment_name for c in configs]
    t0 = time.time()
    try:
        if started_ray:
            # An offline job talks to its experts through handles only: no HTTP proxy, so it never needs (or
            # fights a running service for) Serve's port 8000.
            serve.start(proxy_location="Disabled")
        # One run_many call: every engine loads in parallel, and it returns once all are healthy.
        clients: dict[str, Expert] = await asyncio.to_thread(run_experts, configs)
        log.info("started %d experts in %.0f s", len(configs), time.time() - t0)
        watchdog = ServeWatchdog(asyncio.current_task())
        watchdog.start()
        try:
            yield clients
        except asyncio.CancelledError:
            if watchdog.lost:
                raise ServeLost(f"the job lost Ray Serve: {watchdog.lost}; nothing was retried. Re-run the job "
                                "(cached scores are kept); check memory (`free -g`) and `ray status`.") from None
            raise
        finally:
            watchdog.stop()
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
