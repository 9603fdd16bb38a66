"""How one expert is served: its checkpoint, vLLM engine arguments and Ray Serve resources.

`ExpertConfig` is validated once at the edge (YAML/dict); `engine_args()` and `serve_options()` are the only
places that translate it into vLLM and Ray Serve terms.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experts.cpu_norm import CPU_NORM_PRIORITY

GIB = 1024**3

# Engine arguments the expert sets itself; overriding them through engine_kwargs would break the session
# contract (tokenizer-free token-id prompts, raw log-softmax logprobs), so they are refused.
_RESERVED_ENGINE_KWARGS = frozenset({"model", "skip_tokenizer_init", "logprobs_mode", "max_logprobs"})


def check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources of a replica: names other than Ray's built-in ones, amounts >= 0."""
    builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & resources.keys())
    if builtin:
        raise ValueError(f"resources may not name {builtin}: use num_cpus/num_gpus for those")
    negative = sorted(k for k, v in resources.items() if v < 0)
    if negative:
        raise ValueError(f"resource amounts must be >= 0: {negative}")
    return resources


class ExpertConfig(BaseModel):
    """One expert = one Serve deployment = one vLLM AsyncLLM per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model_path: str                    # a local checkpoint directory, or a Hugging Face hub id ("org/name")
    # Replicas of this expert, each its own engine. A session's steps always reach the replica holding its
    # KV cache (experts/replica_router.py); new sessions spread over replicas by load.
    num_replicas: int = 1
    # Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); replaces
    # num_replicas when set.
    autoscaling_config: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources each replica reserves, for placement: e.g. {"worker_node": 1} puts the replicas on
    # nodes started with `ray start --resources '{"worker_node": N}'`.
    resources: dict[str, float] = Field(default_factory=dict)
    tensor_parallel_size: int = 1
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = 2048
    # CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE). Unset, vLLM takes half the RAM per engine.
    kv_cache_space_gib: float = 1.0
    # CPU only: the cores this engine computes on: "auto" (vLLM's choice: it reserves one core and pins to the
    # rest; on 2 cores every engine lands on core 0), "nobind", or core ids such as "1" or "0-3". In-process
    # engines are pinned to these cores with one thread each; separate ones get VLLM_CPU_OMP_THREADS_BIND.
    cpu_threads_bind: str = "auto"
    # CPU: compute threads of the engine. Unset: one per bound core (torch's default when unbound). With
    # "nobind" and 1, the OS places each engine's single thread where a core is free. Also OMP_NUM_THREADS, so
    # a separate vLLM process (engine_process "separate", the bench's baseline server) gets as many.
    cpu_threads: int | None = Field(None, ge=1)
    # Where vLLM's engine runs. "separate": AsyncLLM, with vLLM's EngineCore (and on CPU its Worker) in their
    # own processes, the usual layout on GPUs. "inproc": vLLM's engine inside the replica's process, stepped
    # by one thread (experts/inproc_engine.py): no inter-process hops per step; on the 2-core dev CPU a session
    # step took 4.2 ms instead of 6.2 (12.6 instead of 22.3 at 32 sessions). "auto": inproc on CPU, separate on GPU.
    engine_process: Literal["auto", "inproc", "separate"] = "auto"
    # The per-token calls pinned to one replica (session steps, generation polls, closes) go over a direct TCP
    # connection to it (experts/data_plane.py, ~0.2 ms) instead of a Serve handle call (~4 ms on the 2-core
    # dev machine); Serve still places replicas, routes new work and checks health. "auto": on, unless
    # autoscaling_config is set (Serve's autoscaler counts only the requests it routes). "on" / "off" force it.
    data_plane: Literal["auto", "on", "off"] = "auto"
    # GPU only: fraction of device memory for weights + KV cache.
    gpu_memory_utilization: float = 0.9
    # True skips torch.compile (and CUDA graphs on GPU). On the 2-core dev CPU, a compiled demo expert's session
    # step took 18-28 % less time, but with four engines starting at once vLLM's engine init took ~100 s the
    # first time and ~40 s from its compile cache (~/.cache/vllm), against ~1 s eager: README "Speed",
    # "Compiled engines". The GPU configs (deploy/cluster.yaml) set false.
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    # Paused decode sessions hold a scheduler slot, so this also bounds the number of open sessions.
    max_num_seqs: int = 64
    max_top_k: int = 20
    # Sessions not advanced for this long are closed (checked on open), so a crashed caller cannot leak slots.
    session_idle_timeout_s: float = 600.0
    seed: int = 0
    # Concurrent handle calls one replica accepts (Serve's default of 5 would serialize the orchestrator).
    max_ongoing_requests: int = 256
    # How often Serve asks the replica whether its engine lives, and how long it waits for the answer; a
    # failed check replaces the replica (e.g. after its engine-core process died).
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    # Passed verbatim to vllm AsyncEngineArgs (e.g. {"max_num_batched_tokens": 4096}).
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_identifier_like(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError(f"name must be non-empty and use only letters, digits, '-' or '_', got {v!r}")
        return v

    @field_validator("model_path")
    @classmethod
    def _model_path_nonempty(cls, v: str) -> str:
        # Existence is checked where the engine starts (the path may only exist on the worker node).
        if not v.strip():
            raise ValueError("model_path must be a non-empty path to a Hugging Face checkpoint directory")
        return v

    @field_validator("cpu_threads_bind")
    @classmethod
    def _bind_spec(cls, v: str) -> str:
        if v not in ("auto", "nobind") and not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", v):
            raise ValueError(f"cpu_threads_bind must be 'auto', 'nobind' or core ids like '1' or '0-3,6', got {v!r}")
        return v

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _resources_nonnegative(cls, v: float, info: Any) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v)

    @field_validator("kv_cache_space_gib", "session_idle_timeout_s", "health_check_period_s", "health_check_timeout_s")
    @classmethod
    def _positive_float(cls, v: float, info: Any) -> float:
        if v <= 0:
            raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("num_replicas", "tensor_parallel_size", "max_model_len", "max_num_seqs",
                     "max_top_k", "max_ongoing_requests")
    @classmethod
    def _positive_int(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {v}")
        return v

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_kwargs_not_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_RESERVED_ENGINE_KWARGS & v.keys())
        if clash:
            raise ValueError(f"engine_kwargs may not set {clash}: the expert sets them to keep its contract")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> ExpertConfig:
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2 (one prompt token plus the predicted one)")
        # On GPU the replica's mp executor spreads TP ranks over the GPUs Ray gave this actor.
        if self.on_gpu and self.num_gpus < self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus >= {self.tensor_parallel_size}"
                f" (got num_gpus={self.num_gpus})"
            )
        return self

    @property
    def is_hub_id(self) -> bool:
        """"org/name" that is not a local path: vLLM downloads it (where the cluster has network)."""
        from pathlib import Path

        p = self.model_path
        return (re.fullmatch(r"[\w.-]+/[\w.-]+", p) is not None and not p.startswith(".")
                and not Path(p).expanduser().exists())

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def engine_inproc(self) -> bool:
        """True when vLLM's engine runs inside the replica's process (see engine_process)."""
        return self.engine_process == "inproc" or (self.engine_process == "auto" and not self.on_gpu)

    @property
    def data_plane_on(self) -> bool:
        """True when pinned per-token calls bypass Serve's handles (see data_plane)."""
        return self.data_plane == "on" or (self.data_plane == "auto" and self.autoscaling_config is None)

    def engine_cores(self) -> set[int] | None:
        """The cores cpu_threads_bind names ("0", "1,3", "0-3"), or None for "auto" / "nobind"."""
        if self.cpu_threads_bind in ("auto", "nobind"):
            return None
        cores: set[int] = set()
        for part in self.cpu_threads_bind.split(","):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
        return cores

    @property
    def max_session_len(self) -> int:
        """Longest context (prompt + advanced tokens) that still leaves room for the predicted token."""
        return self.max_model_len - 1

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for vllm AsyncEngineArgs (engine_kwargs last, so they win)."""
        args: dict[str, Any] = {
            "model": self.model_path,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            # The orchestrator owns tokenization: prompts arrive as TokensPrompt(prompt_token_ids=...).
            "skip_tokenizer_init": True,
            "max_logprobs": self.max_top_k,
            # Raw log-softmax of the model logits: independent of temperature, penalties and bad words.
            "logprobs_mode": "raw_logprobs",
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_seqs": self.max_num_seqs,
            "seed": self.seed,
        }
        if self.on_gpu:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            # Same effect as VLLM_CPU_KVCACHE_SPACE but per engine, not per process environment.
            args["kv_cache_memory_bytes"] = int(self.kv_cache_space_gib * GIB)
            if self.enforce_eager:    # vLLM's C++ RMSNorm, not its CPU default's op chain (compiling fuses that)
                args["ir_op_priority"] = {op: list(order) for op, order in CPU_NORM_PRIORITY.items()}
        args.update(self.engine_kwargs)
        return args

    def env_vars(self) -> dict[str, str]:
        """Environment of the replica process (the CPU backend reads VLLM_CPU_KVCACHE_SPACE at startup).

        The variable only takes whole GiB and overrides kv_cache_memory_bytes, so a fractional size (e.g. 0.25
        for tests) is left to the engine argument alone.
        """
        if self.on_gpu:
            return {}
        env = {"VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind}
        if self.cpu_threads:
            env["OMP_NUM_THREADS"] = str(self.cpu_threads)
        if self.kv_cache_space_gib == int(self.kv_cache_space_gib):
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_space_gib))
        return env

    def serve_options(self) -> dict[str, Any]:
        """Options for serve.deployment(ExpertServer).options(**...); runtime_env lives in ray_actor_options."""
        from experts.replica_router import ROUTER_PATH

        scale = ({"autoscaling_config": self.autoscaling_config} if self.autoscaling_config
                 else {"num_replicas": self.num_replicas})
        return {
            "name": self.deployment_name,
            **scale,
            "max_ongoing_requests": self.max_ongoing_requests,
            "request_router_config": {"request_router_class": ROUTER_PATH},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                **({"resources": dict(self.resources)} if self.resources else {}),
                "runtime_env": {"env_vars": self.env_vars()},
            },
        }

    @property
    def deployment_name(self) -> str:
        return f"expert-{self.name}"

    def session_capacity(self) -> int:
        """Open sessions allowed: max_num_seqs minus a reserve so score() requests can still be scheduled."""
        reserve = max(1, math.ceil(self.max_num_seqs / 8))
        return max(1, self.max_num_seqs - reserve)
