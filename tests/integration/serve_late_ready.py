"""`ensemble serve` whose startup keeps waiting after the app is RUNNING, for tests/integration/test_serve_stop.py.

The gateway answers (its /health is up) a little before `ensemble serve` sees Serve's status turn RUNNING and
says "ready"; a stop in that window must still drain the streams the gateway serves. This widens the window
to LATE_READY_S seconds (the first wait only: the drain's own redeploy waits as usual) so the test hits it
every time. Everything else is the real command.

    python -m tests.integration.serve_late_ready serve --config FILE
"""

from __future__ import annotations

import sys
import time

import deploy.app

LATE_READY_S = 120.0    # a stop ends the wait at once, so a long window costs the test nothing
_real_wait_running = deploy.app.wait_running
_calls = 0


def _late_wait_running(app_name: str, timeout_s: float) -> None:
    global _calls
    _real_wait_running(app_name, timeout_s)
    _calls += 1
    if _calls == 1:
        time.sleep(LATE_READY_S)


if __name__ == "__main__":
    from orchestrator.cli import main

    deploy.app.wait_running = _late_wait_running
    sys.exit(main(sys.argv[1:]))
