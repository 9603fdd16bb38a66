"""The expert interface the orchestrator and the gate trainer talk to, and its typed messages.

Every call is batched: one call carries the steps of many concurrent sequences for the same expert, so the
per-call round trip (the dominant cost, see shared/FACTS.md) is paid once per engine step, not once per
sequence. Per-item failures come back as `error` on that item; they never fail the batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

# Why a step failed. "input": the request itself is wrong (a 4xx for the client; retrying cannot help).
# "capacity": the engine has no free session slot now (retry later: a 429/503 for the client).
# "engine": the engine failed this session (it was closed). "unavailable": the replica could not be reached,
# died or timed out; the session is gone with it, and re-opening it elsewhere (migration) may succeed.
ErrorKind = Literal["input", "capacity", "engine", "unavailable"]


@dataclass(frozen=True)
class TopK:
    """Top-k next-token log-probabilities, sorted by descending logprob. K = len(token_ids)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs), "TopK ids/logprobs length mismatch"


@dataclass(frozen=True)
class SessionStep:
    """One sequence's part of a batched open/advance call.

    open:    token_ids is the whole prompt (non-empty).
    advance: token_ids are the tokens appended since the last call (one, or several to catch up).
    """

    session_id: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepOutput:
    """Result for one SessionStep: the next-token top-k after all tokens fed so far, or an error."""

    session_id: str
    topk: TopK | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    # Number of tokens the session now holds (prompt + advanced); lets callers assert catch-up was exact.
    length: int = 0
    replica: str = ""          # the replica that holds the session: later steps are pinned to it
    server_s: float = 0.0      # time the replica spent on the call that carried this step (RPC accounting)


@dataclass(frozen=True)
class StepReply:
    """A replica's answer to one batched open/advance call."""

    replica: str
    outputs: tuple[StepOutput, ...]
    server_s: float


@dataclass(frozen=True)
class ScoreOutput:
    """Teacher-forced scores of one sequence x[0..T-1].

    Position j (0 <= j < T-1) describes the prediction of x[j+1] from x[0..j]:
      topk_ids[j] / topk_logprobs[j] are the top-k tokens (K each, descending),
      target_logprobs[j] is the logprob of the actual token x[j+1].
    """

    token_ids: tuple[int, ...]
    topk_ids: tuple[tuple[int, ...], ...] = ()
    topk_logprobs: tuple[tuple[float, ...], ...] = ()
    target_logprobs: tuple[float, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A sequence the expert's engine decodes on its own (one expert makes every token: nothing to mix)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    top_k: int = 0                   # 0: all tokens


@dataclass(frozen=True)
class GenerateDelta:
    """New tokens of one generation since its previous delta; the last one carries finish_reason or error."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()                                  # raw log-softmax of each token
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()      # per token, when asked for
    finish_reason: str | None = None                                  # "stop" | "length"
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class StartReply:
    """A replica's answer to starting generations: per request None (running) or (error, kind)."""

    replica: str
    errors: tuple[tuple[str, ErrorKind] | None, ...]


@dataclass(frozen=True)
class PollReply:
    """Everything a replica's engine produced for one caller's generations since its previous poll."""

    replica: str
    deltas: tuple[GenerateDelta, ...]


@dataclass(frozen=True)
class ReplicaStats:
    replica: str
    open_sessions: int
    generations: int
    data_plane_connections: int = 0     # accepted since the replica started (experts/data_plane.py)
    data_plane_calls: int = 0           # calls answered over them
    engine_steps: int = 0               # vLLM engine steps so far (in-process engines only)
    engine_step_s: float = 0.0          # wall time inside them


@dataclass(frozen=True)
class ExpertInfo:
    """What the orchestrator must know about an expert; validated once at startup."""

    name: str
    model_path: str
    vocab_size: int              # size of the logit vector (config.vocab_size)
    max_model_len: int
    tokenizer_fingerprint: str   # sha256 over the tokenizer's vocab + merges + special tokens
    eos_token_id: int | None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Expert(Protocol):
    """Session stepping, native generation and teacher-forced scoring. Implementations: experts.vllm_expert
    (inside a replica) and experts.client.ServeExpertClient (every replica of a deployment, from outside)."""

    async def info(self) -> ExpertInfo: ...

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def close(self, session_ids: list[str]) -> None: ...

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]: ...
