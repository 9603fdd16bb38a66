"""Tools for the fault tests: find the real processes behind Serve replicas, run streams in threads, and wait
for the service to recover. No mocks: faults are signals sent to real replica and engine processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from deploy.replicas import ReplicaInfo
from deploy.replicas import replicas as live_replicas


def replicas(app: str, deployment: str) -> list[ReplicaInfo]:
    """The RUNNING replicas of one deployment, with their pids, as Serve's controller reports them."""
    return [r for r in live_replicas(app, deployment) if r.pid]


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every descendant of pid, from /proc."""
    parent_of: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parent_of[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        names[int(entry)] = name
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parent_of.items():
            if pp == p:
                out.append((c, names[c]))
                frontier.append(c)
    return out


def engine_core_pid(replica_pid: int) -> int:
    cores = [p for p, name in children(replica_pid) if name.startswith("VLLM::EngineCor")]   # comm is cut at 15 chars
    assert len(cores) == 1, f"expected one vLLM EngineCore under replica pid {replica_pid}: {children(replica_pid)}"
    return cores[0]


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def wait_for(what: str, predicate, timeout_s: float = 300.0, poll_s: float = 0.5):
    """Poll `predicate` until it returns a truthy value (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the service may be mid-restart
            last_error = exc
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error!r})")


def health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health", timeout=30).json()


def wait_all_experts_ok(base_url: str, names: list[str], timeout_s: float = 400.0) -> None:
    """Until /health reports every expert ok (not down, not recently failing) and each one answers alone."""

    def ok() -> bool:
        body = health(base_url)
        if any(body["experts"][n]["state"] == "down" for n in names):
            return False
        for n in names:
            r = httpx.post(f"{base_url}/v1/completions", timeout=120,
                           json={"model": n, "prompt": "a", "max_tokens": 2, "ignore_eos": True})
            if r.status_code != 200:
                return False
        return health(base_url)["status"] == "ok"

    wait_for(f"experts {names} to be ok again", ok, timeout_s, poll_s=2.0)


@dataclass
class StreamRun:
    """One streamed completion read in a thread; `started` is set once `after_tokens` tokens arrived."""

    base_url: str
    body: dict
    after_tokens: int = 4
    started: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    error: str | None = None
    status: int | None = None
    request_id: str | None = None
    degraded_positions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamRun:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 600.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"stream {self.request_id} still running after {timeout_s:.0f} s"

    def _run(self) -> None:
        body = {**self.body, "stream": True, "stream_options": {"include_usage": True}, "return_routing": True}
        try:
            with httpx.stream("POST", f"{self.base_url}/v1/completions", json=body, timeout=300) as r:
                self.status, self.request_id = r.status_code, r.headers.get("x-ensemble-request-id")
                if r.status_code != 200:
                    self.error = r.read().decode()
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]["message"]
                        continue
                    if chunk.get("usage"):
                        self.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        self.text += choice.get("text", "")
                        routing = choice.get("routing") or {}
                        self.tokens += len(routing.get("tokens", []))
                        self.degraded_positions += routing.get("degraded", [])
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if self.tokens >= self.after_tokens:
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 - recorded, the test asserts on it
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()


def run_streams(base_url: str, bodies: list[dict], fault=None, after_tokens: int = 4) -> list[StreamRun]:
    """Start one stream per body; once every stream has `after_tokens` tokens, call fault(); wait for all."""
    runs = [StreamRun(base_url, b, after_tokens).start() for b in bodies]
    for run in runs:
        assert run.started.wait(300), "a stream never started"
    if fault is not None:
        early = {run.request_id: run.tokens for run in runs if run.finish_reason is not None}
        fault()
        # A stream that had ended before the fault cannot show its effect: say so instead of failing later on
        # a misleading count (a faster service can end a short stream while the others are still starting).
        assert not early, f"streams ended before the fault was injected (make them longer): {early}"
    for run in runs:
        run.join()
    return runs


# ---- raw-socket clients: a stream held open without reading it, and a real TCP reset ----------------------

def send_completion(base_url: str, body: dict) -> socket.socket:
    """POST /v1/completions on a fresh TCP connection; the response is left unread."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=300)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return s


def read_first_event(s: socket.socket) -> str:
    """Read a streamed response up to its first SSE event; returns its request id (asserts a 200)."""
    seen = b""
    while b"data: " not in seen:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the first event: {seen[:200]!r}")
        seen += chunk
    head = seen.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    return next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.lower().startswith("x-ensemble-request-id:"))


def reset(s: socket.socket) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a client that crashed or was cut off."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def metric(base_url: str, name: str) -> float:
    """The sum of every sample of one metric on /metrics (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


# ---- a service or job run as its own process tree ----------------------------------------------------------

def descendants(pid: int) -> dict[int, psutil.Process]:
    """Every process under pid now (its Ray, replicas, engines), to check later that they all went away."""
    return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}


def assert_all_exit(procs: dict[int, psutil.Process], timeout_s: float = 60.0) -> None:
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    assert not alive, [f"{p.pid} {p.name()}" for p in alive]


def kill_all(procs: dict[int, psutil.Process]) -> None:
    """Teardown: whatever of `procs` is still alive (a failed test must not leave engines running)."""
    for p in procs.values():
        try:
            p.kill()
        except psutil.Error:
            pass
