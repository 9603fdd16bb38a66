"""Ray Serve side of an expert: the replica class that owns one VLLMExpert, and its deployment options.

One handle call carries a whole batch (every sequence's step for this expert on this replica), so the
orchestrator pays one RPC per replica per engine step. Every call accepts `replica=`, which only the
router reads (experts/replica_router.py). The client side is experts/client.py.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from experts.answer_checks import probe_problem
from experts.config import ExpertConfig
from experts.data_plane import DataPlaneServer, Endpoint
from experts.protocol import (
    ExpertInfo,
    GenerateRequest,
    PollReply,
    ReplicaStats,
    ScoreOutput,
    SessionStep,
    StartReply,
    StepReply,
)
from experts.self_check import SoundnessWatch
from experts.thread_priority import raise_relay_thread, relay_policy_of

log = logging.getLogger(__name__)


class ExpertServer:
    """Body of one Serve replica: starts the vLLM engine in __init__ and serves the batched calls.

    Kept undecorated so the same class can be deployed with per-expert options (name, resources,
    runtime_env, router) by `expert_app`, or bound by a larger application builder (deploy.app.build_app).
    """

    def __init__(self, config: ExpertConfig | dict) -> None:
        from ray import serve

        from experts.vllm_expert import VLLMExpert  # vLLM is imported only inside the replica process

        self.config = config if isinstance(config, ExpertConfig) else ExpertConfig(**config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._expert = VLLMExpert(self.config)
        self._gauges = _replica_gauges(self.config.name, self.replica)
        self._data_plane: DataPlaneServer | None = None
        self._soundness = SoundnessWatch(self._self_probe, f"expert {self.config.name} replica {self.replica}")
        self._expert.generations.on_logprobs = self._soundness.observe_generated
        self._probe_ids = itertools.count()
        self._relay: str | None = None             # the serving loop's priority, once raised (_raise_relay)
        log.info("expert %s replica %s serving %s", self.config.name, self.replica, self.config.model_path)

    async def info(self, replica: str | None = None) -> ExpertInfo:
        return await self._expert.info()

    async def open(self, steps: list[SessionStep], top_k: int, replica: str | None = None) -> StepReply:
        t0 = time.perf_counter()
        outputs = await self._expert.open(steps, top_k)
        self._publish()
        self._soundness.observe(outputs)
        return StepReply(self.replica, tuple(outputs), time.perf_counter() - t0)

    async def advance(self, steps: list[SessionStep], top_k: int, replica: str | None = None) -> StepReply:
        t0 = time.perf_counter()
        outputs = await self._expert.advance(steps, top_k)
        self._soundness.observe(outputs)
        return StepReply(self.replica, tuple(outputs), time.perf_counter() - t0)

    async def close(self, session_ids: list[str], replica: str | None = None) -> None:
        await self._expert.close(session_ids)
        self._publish()

    async def start(self, requests: list[GenerateRequest], caller: str, replica: str | None = None) -> StartReply:
        return StartReply(self.replica, tuple(self._expert.start(requests, caller)))

    async def poll(self, caller: str, aborts: list[str], wait_s: float, replica: str | None = None) -> PollReply:
        return PollReply(self.replica, tuple(await self._expert.poll(caller, aborts, wait_s)))

    async def _watch(self, caller: str, emit: Callable[[PollReply], None]) -> None:
        """Data plane only: push `caller`'s deltas as they come until its connection goes."""
        await self._expert.generations.watch(caller, lambda deltas: emit(PollReply(self.replica, tuple(deltas))))

    async def endpoint(self, replica: str | None = None) -> Endpoint | None:
        """This replica's data plane (started on first ask, on the loop that serves every call), or None when
        the expert is configured to take every call through Serve."""
        self._raise_relay()
        if not self.config.data_plane_on:
            return None
        if self._data_plane is None:
            import ray

            self._data_plane = DataPlaneServer({"open": self.open, "advance": self.advance, "poll": self.poll,
                                                "close": self.close, "watch": self._watch, "start": self.start},
                                               ray.util.get_node_ip_address())
        return await self._data_plane.start()

    async def cut_data_plane(self, replica: str | None = None) -> int:
        """Fault injection and drain: reset every data-plane connection now; callers reconnect."""
        return self._data_plane.cut() if self._data_plane is not None else 0

    async def corrupt_weights(self, replica: str | None = None) -> str:
        """Fault injection: fill one weight of this replica's live model with NaN, as a corrupt checkpoint would
        load (experts/fault_injection.py; only a new replica is sound again). -> the weight's name. In-process
        engines only."""
        from experts.fault_injection import ENABLE, enabled, nan_weight

        if not enabled():
            raise PermissionError(f"fault injection is off on this replica (set {ENABLE}=1 in its environment)")
        on_model = getattr(self._expert.engine, "on_model", None)
        if on_model is None:
            raise NotImplementedError("weights can be corrupted in an in-process engine only (engine_process: inproc)")
        return await on_model(nan_weight)

    async def score(self, sequences: list[list[int]], top_k: int, replica: str | None = None) -> list[ScoreOutput]:
        return await self._expert.score(sequences, top_k)

    async def stats(self, replica: str | None = None) -> ReplicaStats:
        dp, engine = self._data_plane, self._expert.engine
        return ReplicaStats(self.replica, self._expert.num_open_sessions, len(self._expert.generations),
                            dp.connections_accepted if dp else 0, dp.calls_served if dp else 0,
                            getattr(engine, "steps", 0), getattr(engine, "step_s", 0.0), self._soundness.state,
                            relay_policy_of(threading.get_native_id()))

    async def num_open_sessions(self, replica: str | None = None) -> int:
        return self._expert.num_open_sessions

    def _raise_relay(self) -> None:
        """Once, on the event loop that serves every call (which relays this replica's answers): real-time
        priority where the OS allows it (experts/thread_priority.py). The first health check or endpoint
        request runs it, whichever comes first; both run on that loop."""
        if self._relay is None:
            self._relay = raise_relay_thread()
            log.info("expert %s replica %s: event loop priority %s", self.config.name, self.replica, self._relay)

    async def check_health(self) -> None:
        self._raise_relay()
        # Serve restarts the replica when this raises: the engine-core process died, or the model answers
        # nonsense (experts/self_check.py).
        if self._soundness.verdict is not None:
            raise RuntimeError(self._soundness.verdict)
        await self._expert.check_health()
        self._soundness.start_baseline()     # once: whether this engine answers soundly at all (in the background)
        self._publish()

    async def _self_probe(self) -> str | None:
        """A one-token session on a fixed token, opened and closed -> what is wrong with its answer, or None when
        it is sound. Raises when the engine gives no answer (busy or stopping: no evidence either way).
        experts/self_check.py."""
        info = await self._expert.info()
        sid = f"self-probe.{self.replica}.{next(self._probe_ids)}"
        (out,) = await self._expert.open([SessionStep(sid, (info.eos_token_id or 0,))], 1)
        if out.error is not None:                 # nothing was opened
            raise RuntimeError(f"the probe was refused ({out.error_kind}: {out.error})")
        try:
            return probe_problem(out, info.vocab_size)
        finally:
            try:
                await self._expert.close([sid])
            except Exception:                     # its verdict stands; the idle reaper closes it
                log.exception("expert %s: could not close the self-probe's session", self.config.name)

    def _publish(self) -> None:
        """Open sessions and generations of this replica, through Ray's metrics pipeline (one Prometheus
        scrape of the cluster sees every replica on every node)."""
        sessions, generations = self._gauges
        sessions.set(self._expert.num_open_sessions)
        generations.set(len(self._expert.generations))

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook: what a load-aware router may read of this replica."""
        return {"open_sessions": self._expert.num_open_sessions, "generations": len(self._expert.generations)}

    def __del__(self) -> None:
        # Serve calls __del__ on replica shutdown: stop the engine-core process with it.
        expert = getattr(self, "_expert", None)
        if expert is not None:
            expert.shutdown()


def _replica_gauges(expert: str, replica: str) -> tuple[Any, Any]:
    from ray.util.metrics import Gauge

    tags = {"expert": expert, "replica": replica}
    sessions = Gauge("ensemble_expert_open_sessions", "decode sessions open on this expert replica",
                     tag_keys=("expert", "replica"))
    generations = Gauge("ensemble_expert_generations", "native generations running on this expert replica",
                        tag_keys=("expert", "replica"))
    sessions.set_default_tags(tags)
    generations.set_default_tags(tags)
    return sessions, generations


def expert_app(config: ExpertConfig) -> Any:
    """The bound Serve application (or sub-graph node) for one expert, with its resources, env and router."""
    from ray import serve

    return serve.deployment(ExpertServer).options(**config.serve_options()).bind(config.model_dump())


def run_experts(configs: list[ExpertConfig]) -> dict[str, Any]:
    """Deploy each expert as its own Serve application (engines start in parallel); return clients by name.

    Needs ray.init (or a running cluster) first. Blocks until every replica is healthy.
    """
    from ray import serve

    from experts.client import ServeExpertClient

    targets = [serve.RunTarget(expert_app(c), name=c.deployment_name, route_prefix=None) for c in configs]
    handles = serve.run_many(targets)
    return {c.name: ServeExpertClient(h, c.name) for c, h in zip(configs, handles)}


def connect_experts(names: list[str], app_name: str | None = None) -> dict[str, Any]:
    """Clients for already-running expert deployments (own apps by default, or inside `app_name`)."""
    from ray import serve

    from experts.client import ServeExpertClient

    def handle(name: str) -> Any:
        deployment = f"expert-{name}"
        return serve.get_deployment_handle(deployment, app_name or deployment)

    return {n: ServeExpertClient(handle(n), n) for n in names}
