"""Engine processes an earlier run left behind: vLLM EngineCore/Worker processes whose parent is gone.

A vLLM engine process is always the child of the process that owns it (an expert replica, or an EngineCore
for a Worker); one whose parent is init (pid 1) serves nobody. They ignore SIGTERM, so they get SIGKILL.
Engines started by this version die with their parent (experts/vllm_plugin.py); this reaps what older runs,
or a kill that raced a start, left.
"""

from __future__ import annotations

import psutil

ENGINE_NAME_PREFIX = "VLLM::"


def orphan_engines() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "ppid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if title.startswith(ENGINE_NAME_PREFIX) and p.info["ppid"] == 1:
            found.append(p)
    return found


def reap_orphan_engines(timeout_s: float = 10.0) -> int:
    """SIGKILL every orphaned engine process and wait for it; returns how many there were."""
    procs = orphan_engines()
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)
    return len(procs)


def earlier_services() -> list[psutil.Process]:
    """Other `ensemble serve` processes on this machine (not this one, nor its parents)."""
    import os

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["pid"] in mine or len(cmd) < 2:
            continue
        prog = next((i for i, c in enumerate(cmd[:3]) if c.endswith("/ensemble") or c == "ensemble"), None)
        if prog is not None and cmd[prog + 1:prog + 2] == ["serve"]:
            found.append(p)
    return found
