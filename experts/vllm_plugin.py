"""A vLLM general plugin (entry point `vllm.general_plugins`): vLLM loads it in every process it starts.

It ties each engine process to its parent's life. vLLM's EngineCore (a child of the process that made the
AsyncLLM: our expert replica) and its Worker (a child of the EngineCore) otherwise outlive a parent that
was killed, holding gigabytes and ignoring SIGTERM (seen after a hard stop of `make serve`). With
PR_SET_PDEATHSIG the kernel sends them SIGKILL when their parent dies, however it dies. Processes that
vLLM did not start (the replica itself, vLLM's API server) are left alone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def register() -> None:
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return                        # not a child vLLM spawned (or no prctl here)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:    # the parent died before the signal was armed
        os._exit(1)
