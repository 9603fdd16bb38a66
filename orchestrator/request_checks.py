"""What a generation request must satisfy before any expert sees it: one set of checks, pure.

`EnsembleEngine.validate` runs them on every request it takes, so a caller of the engine that skips HTTP
(`ensemble eval`, scripts) gets the same refusals as the gateway; the gateway runs them through the engine
once per request and renders a refusal in OpenAI's error format, with the field and code it names here.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.types import ENSEMBLE, GenerationRequest


class RequestRejected(ValueError):
    """A request the service will not run, for a reason its sender can fix. `param` names the offending field
    ("prompt" for the prompt in whatever form it came: the gateway says "messages" for a chat)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True)
class Limits:
    """What the serving experts accept."""

    models: tuple[str, ...]          # "ensemble" first, then every expert by name
    vocab_size: int
    max_model_len: int               # the smallest context length of the experts

    @property
    def n_experts(self) -> int:
        return len(self.models) - 1


def check_request(req: GenerationRequest, limits: Limits) -> None:
    """Raise RequestRejected for the first thing wrong with `req`: model, experts per token, prompt, length."""
    if req.model not in limits.models:
        raise RequestRejected(f"The model '{req.model}' does not exist; available: {', '.join(limits.models)}",
                              param="model", code="model_not_found", status=404)
    k = req.experts_per_token
    if k is not None:
        if req.model != ENSEMBLE:
            raise RequestRejected(f"experts_per_token applies to model '{ENSEMBLE}' only", param="experts_per_token",
                                  code="invalid_parameter")
        if not 1 <= k <= limits.n_experts:
            raise RequestRejected(f"experts_per_token must be in [1, {limits.n_experts}] (the experts behind model "
                                  f"'{ENSEMBLE}'), got {k}", param="experts_per_token", code="invalid_parameter")
    ids = req.prompt_ids
    if not ids:
        raise RequestRejected("the prompt is empty", param="prompt")
    bad = outside_vocabulary(ids, limits.vocab_size)
    if bad is not None:
        raise RequestRejected(f"prompt token id {bad} is outside the vocabulary [0, {limits.vocab_size})",
                              param="prompt")
    ctx, asked = limits.max_model_len, req.params.max_tokens
    if len(ids) + asked > ctx:
        raise RequestRejected(
            f"This model's maximum context length is {ctx} tokens. However, you requested {len(ids) + asked} "
            f"tokens ({len(ids)} in the prompt, {asked} for the completion). Please reduce the length of the "
            "prompt or max_tokens.",
            param="max_tokens" if len(ids) < ctx else "prompt", code="context_length_exceeded")


def outside_vocabulary(ids: tuple[int, ...] | list[int], vocab_size: int) -> int | None:
    """The first token id not in [0, vocab_size), or None when they all are."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)
