"""Ray Serve side of an expert: the replica class that owns one VLLMExpert, and the Expert client over a handle.

One handle call carries a whole batch (all sequences' steps for this expert), so the orchestrator pays one
RPC per expert per engine step. `ExpertServer` is a plain class; `expert_app(config)` makes it a deployment.
"""

from __future__ import annotations

import logging
from typing import Any

from experts.config import ExpertConfig
from experts.protocol import ExpertInfo, ScoreOutput, SessionStep, StepOutput

log = logging.getLogger(__name__)


class ExpertServer:
    """Body of one Serve replica: starts the vLLM engine in __init__ and forwards the protocol methods.

    Kept undecorated so the same class can be deployed with per-expert options (name, resources,
    runtime_env) by `expert_app`, or bound by a larger application builder (deploy.app.build_app).
    """

    def __init__(self, config: ExpertConfig | dict) -> None:
        from experts.vllm_expert import VLLMExpert  # vLLM is imported only inside the replica process

        self.config = config if isinstance(config, ExpertConfig) else ExpertConfig(**config)
        self._expert = VLLMExpert(self.config)
        log.info("expert %s serving %s", self.config.name, self.config.model_path)

    async def info(self) -> ExpertInfo:
        return await self._expert.info()

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        return await self._expert.open(steps, top_k)

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        return await self._expert.advance(steps, top_k)

    async def close(self, session_ids: list[str]) -> None:
        await self._expert.close(session_ids)

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        return await self._expert.score(sequences, top_k)

    async def num_open_sessions(self) -> int:
        return self._expert.num_open_sessions

    async def check_health(self) -> None:
        # Serve restarts the replica when this raises (e.g. the engine-core process died).
        await self._expert.check_health()

    def __del__(self) -> None:
        # Serve calls __del__ on replica shutdown: stop the engine-core process with it.
        expert = getattr(self, "_expert", None)
        if expert is not None:
            expert.shutdown()


def expert_app(config: ExpertConfig) -> Any:
    """The bound Serve application (or sub-graph node) for one expert, with its resources and env."""
    from ray import serve

    return serve.deployment(ExpertServer).options(**config.serve_options()).bind(config.model_dump())


class ServeExpertClient:
    """The Expert protocol through a DeploymentHandle to an ExpertServer; one RPC per batched call."""

    def __init__(self, handle: Any, name: str) -> None:
        self._handle = handle
        self.name = name

    async def info(self) -> ExpertInfo:
        return await self._handle.info.remote()

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        return await self._handle.open.remote(steps, top_k)

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        return await self._handle.advance.remote(steps, top_k)

    async def close(self, session_ids: list[str]) -> None:
        await self._handle.close.remote(session_ids)

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        return await self._handle.score.remote(sequences, top_k)

    async def num_open_sessions(self) -> int:
        return await self._handle.num_open_sessions.remote()

    def __repr__(self) -> str:
        return f"ServeExpertClient({self.name!r})"


def run_experts(configs: list[ExpertConfig]) -> dict[str, ServeExpertClient]:
    """Deploy each expert as its own Serve application (engines start in parallel); return clients by name.

    Needs ray.init (or a running cluster) first. Blocks until every replica is healthy.
    """
    from ray import serve

    targets = [serve.RunTarget(expert_app(c), name=c.deployment_name, route_prefix=None) for c in configs]
    handles = serve.run_many(targets)
    return {c.name: ServeExpertClient(h, c.name) for c, h in zip(configs, handles)}


def connect_experts(names: list[str], app_name: str | None = None) -> dict[str, ServeExpertClient]:
    """Clients for already-running expert deployments (own apps by default, or inside `app_name`)."""
    from ray import serve

    def handle(name: str) -> Any:
        deployment = f"expert-{name}"
        return serve.get_deployment_handle(deployment, app_name or deployment)

    return {n: ServeExpertClient(handle(n), n) for n in names}
