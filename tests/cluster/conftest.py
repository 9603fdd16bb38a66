"""A real multi-node Ray cluster on this one machine, for tests/cluster: `ray start --head` and `ray start
--address=...` as subprocesses, each node with its own temp dir, working dir, ports and custom resources.

This is its own pytest session (`pytest tests/cluster`, `make test-cluster`): the driver joins the cluster with
ray.init(address=...), which cannot share a process with the local Ray that tests/integration starts.
Teardown never runs `ray stop` (it kills every Ray on the machine, other users' too): it ends the processes
whose command line names this cluster's temp dir, and their descendants (vLLM's EngineCore included), by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "ray")
NODE_IP = "127.0.0.1"


def pytest_configure(config) -> None:
    """This session's driver joins the cluster with token authentication. Ray reads RAY_AUTH_MODE once, when this
    process first loads it, so the variables are set here, before any test module imports ray."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse to share a session with other test folders: tests/integration starts a local Ray in-process."""
    here = Path(__file__).parent
    mine = [i for i in items if here in Path(str(i.fspath)).parents]
    if mine and len(mine) != len(items):
        skip = pytest.mark.skip(reason="tests/cluster runs in its own pytest session: "
                                       "`pytest tests/cluster` (make test-cluster)")
        for item in mine:
            item.add_marker(skip)


def free_port() -> int:
    # Free on every interface: Ray binds its listeners to the machine's address, not only to loopback.
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    name: str
    temp_dir: Path              # Ray's --temp-dir: sessions, sockets, logs of this node only
    work_dir: Path              # cwd of `ray start`, so each node has its own working directory
    resources: dict[str, float]
    metrics_port: int           # this node's metrics agent (Prometheus text at /metrics)
    node_id: str | None = None


@dataclass
class LocalCluster:
    """A head node and worker nodes, each a `ray start` on this machine."""

    root: Path
    env: dict[str, str]                       # environment of every `ray start` (inherited by every worker)
    gcs_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32))
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.gcs_port}"

    def __post_init__(self) -> None:
        # Token authentication, the way a real cluster runs: one fresh token for every node and the driver
        # (`ray start --head` turns token auth on by itself when ~/.ray/auth_token exists, and a joining node
        # without the token is refused). The driver has the same two variables (pytest_configure).
        self.env = {**self.env, **self.auth_env}

    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _start(self, name: str, resources: dict[str, float], num_cpus: int, head: bool) -> RayNode:
        node = RayNode(name, self.root / name, self.root / f"{name}-work", resources, free_port())
        node.work_dir.mkdir(parents=True)
        argv = [RAY, "start", "--disable-usage-stats",
                f"--node-ip-address={NODE_IP}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
                f"--temp-dir={node.temp_dir}", "--object-store-memory=300000000",
                f"--metrics-export-port={node.metrics_port}",
                # Every listener on a free port: another Ray (someone else's) may run on this machine.
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}"]
        if head:
            argv += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}"]
        else:
            argv += [f"--address={self.address}"]
        out = subprocess.run(argv, check=False, cwd=node.work_dir, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"`ray start` of {name} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float], num_cpus: int = 8) -> RayNode:
        return self._start("head", resources, num_cpus, head=True)

    def add_worker(self, name: str, resources: dict[str, float], num_cpus: int = 8) -> RayNode:
        return self._start(name, resources, num_cpus, head=False)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: command lines naming its root, and all their descendants
        (replica workers, HAProxy, vLLM's VLLM::EngineCore, whose command line names nothing)."""
        root, found = str(self.root), {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(root in part for part in (p.info["cmdline"] or [])):
                    found[p.pid] = p
                    for child in p.children(recursive=True):
                        found[child.pid] = child
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def rss_gib(self) -> float:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 1024**3

    def stop_node(self, node: RayNode, timeout_s: float = 30.0) -> None:
        """Stop one node's processes (its raylet first, so Ray sees the node die) and their descendants."""
        procs = [p for p in self.processes() if _names(p, str(node.temp_dir))]
        _terminate(procs, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> list[str]:
        """Stop everything; -> descriptions of processes that survived (should be none)."""
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            _terminate(procs, timeout_s)
        left = []
        for p in self.processes():
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                pass
        return left


def _names(p: psutil.Process, text: str) -> bool:
    try:
        return any(text in part for part in p.cmdline()) or any(
            text in part for parent in p.parents() for part in parent.cmdline())
    except psutil.Error:
        return False


def _terminate(procs: list[psutil.Process], timeout_s: float) -> None:
    # Snapshot descendants first: a killed parent's children would be re-parented to pid 1 and lost.
    everyone = {p.pid: p for p in procs}
    for p in procs:
        try:
            for c in p.children(recursive=True):
                everyone[c.pid] = c
        except psutil.Error:
            pass
    for p in everyone.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(everyone.values()), timeout=timeout_s)
    for p in alive:                    # EngineCore ignores SIGTERM when its parent is gone (shared/FACTS.md)
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def cluster_root() -> Iterator[Path]:
    # Short, in /tmp: Ray's Unix socket paths (temp_dir/session_.../sockets/plasma_store) must fit 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ens-rc-", dir="/tmp"))
    yield root
    # Keep the nodes' Serve logs of the last run (small) for a post-mortem; drop the rest.
    kept = Path(tempfile.gettempdir()) / "ens-rc-last-logs"
    shutil.rmtree(kept, ignore_errors=True)
    for logs in root.glob("*/session_latest/logs"):
        shutil.copytree(logs, kept / logs.parts[-3], ignore=shutil.ignore_patterns("*.sock", "events"),
                        dirs_exist_ok=True, ignore_dangling_symlinks=True)
    shutil.rmtree(root, ignore_errors=True)
