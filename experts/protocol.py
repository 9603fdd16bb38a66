"""The expert interface the orchestrator and the gate trainer talk to, and its typed messages.

Every call is batched: one call carries the steps of many concurrent sequences for the same expert,
so the per-call round trip (the dominant cost, see shared/FACTS.md) is paid once per engine step,
not once per sequence. Per-item failures come back as `error` on that item; they never fail the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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
    # Number of tokens the session now holds (prompt + advanced); lets callers assert catch-up was exact.
    length: int = 0


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
    """Session-based stepping plus teacher-forced scoring. Implementations: experts.vllm_expert."""

    async def info(self) -> ExpertInfo: ...

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def close(self, session_ids: list[str]) -> None: ...

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]: ...
