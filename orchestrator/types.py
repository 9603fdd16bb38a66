"""Typed messages of the decode engine. Every message carries the request id.

The engine speaks token ids only; text (tokenizing, detokenizing, stop strings) lives in orchestrator/stream.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

ENSEMBLE = "ensemble"           # the model name of the gated mix; every other model name is one expert's


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # sample among the top_k most likely tokens only (0: all)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0          # alternatives to report per token (0..20)

    def __post_init__(self) -> None:
        assert self.max_tokens >= 0, "max_tokens must be >= 0"
        assert self.temperature >= 0.0, "temperature must be >= 0"
        assert 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"
        assert self.top_k >= 0, "top_k must be >= 0 (0: all tokens)"
        assert 0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    # "ensemble" for the gated mix, or one expert's name to be served by that expert alone.
    model: str = ENSEMBLE
    # Experts mixed per token for model="ensemble" (the gate's top-k); None: the service's default.
    experts_per_token: int | None = None


# The two per-token messages below are msgspec Structs, not frozen dataclasses: the decode loop makes one of each
# per row and round, and a frozen dataclass costs 0.5-0.8 µs to build against 0.1 for a Struct (this machine).

class GateDecision(msgspec.Struct, frozen=True):
    """Which experts produce one token, and their mixing weights (softmax over the selected gate logits)."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    entropy: float = 0.0           # entropy of the full gate softmax over all experts (nats)
    degraded: bool = False         # an expert the gate chose could not answer; weights renormalised


class TokenEvent(msgspec.Struct, frozen=True):
    request_id: str
    index: int                     # 0-based position in the completion
    token_id: int
    logprob: float                 # log p_mix(token)
    routing: GateDecision
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None   # "stop" | "length" on the last event, else None


class ExpertsUnavailable(RuntimeError):
    """No expert that could serve this request is answering now (a 503 with Retry-After for the client)."""


class AtCapacity(RuntimeError):
    """The experts have no free session slot for a new request now (a 429 with Retry-After)."""
