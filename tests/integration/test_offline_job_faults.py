"""An offline job needs no HTTP port (it runs beside a service on Serve's default port 8000), and one whose
Serve controller stops answering fails with a clear error, instead of retrying forever, and leaves no engine
behind. Real parts: the job (tests/integration/offline_job.py) runs in its
own process with its own local Ray and a real vLLM expert, as `ensemble eval` does; the fault is a real
SIGSTOP of that Ray's Serve controller process (hung, unreachable, but not restarted by Ray)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import REPO, require_demo
from tests.integration.faults import assert_all_exit, descendants, kill_all

pytestmark = pytest.mark.integration
SERVE_DEFAULT_PORT = 8000
GRACE_S = 5           # ENSEMBLE_SERVE_GRACE_S for the job: how long it tolerates an unreachable controller


def test_an_offline_job_needs_no_http_port_and_fails_clearly_when_its_serve_controller_hangs() -> None:
    require_demo()
    port_8000 = _hold(SERVE_DEFAULT_PORT)      # as a running `make serve` would (None: something already does)
    ray_tmp = tempfile.mkdtemp(prefix="ens-job-", dir="/tmp")       # its own Ray, its own session dir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_"))}
    env.update(RAY_TMPDIR=ray_tmp, ENSEMBLE_SERVE_GRACE_S=str(GRACE_S), VLLM_LOGGING_LEVEL="WARNING")
    log = Path(ray_tmp) / "job.stderr"                 # a file, not a pipe: Ray and vLLM write a lot there
    with open(log, "w") as err:
        job = subprocess.Popen([sys.executable, "-m", "tests.integration.offline_job", "code"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in job.stdout], daemon=True).start()
    family: dict[int, psutil.Process] = {}
    try:
        line = lines.get(timeout=300)                                 # READY, once its expert answers
        assert line.strip() == "READY", (line, job.poll(), log.read_text()[-3000:])
        family = descendants(job.pid)
        (controller,) = [pid for pid, p in family.items() if "ServeController" in " ".join(_cmdline(p))]
        # The expert's replica (its vLLM engine runs inside it: engine_process "auto" on CPU) must go with the job.
        assert any("expert-code" in " ".join(_cmdline(p)) for p in family.values()), family
        assert not [p for p in family.values() if "ProxyActor" in " ".join(_cmdline(p))], "an HTTP proxy started"

        os.kill(controller, signal.SIGSTOP)
        t0 = time.monotonic()
        job.wait(timeout=240)
        elapsed = time.monotonic() - t0
        stderr = log.read_text()
        assert job.returncode == 3, (job.returncode, stderr[-3000:])
        lost = [ln for ln in stderr.splitlines() if ln.startswith("LOST: ")]
        assert lost and "lost Ray Serve" in lost[0] and "nothing was retried" in lost[0], lost or stderr[-2000:]
        print(f"\njob stopped {elapsed:.0f} s after its controller hung: {lost[0][:200]}")

        # Its Ray and every engine went with it (the job started that Ray, so it shut it down).
        assert_all_exit(family)
    finally:
        if job.poll() is None:
            job.kill()
        kill_all(family)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if port_8000 is not None:
            port_8000.close()


def _hold(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
