"""orchestrator.native.native_events: a lost generation restarts from the tokens already produced; an expert
that produces nothing on two attempts in a row is not answering (ExpertsUnavailable, a 503), instead of every
attempt waiting out the step timeout on a hung replica."""

from __future__ import annotations

import pytest

from experts.protocol import GenerateDelta
from orchestrator.native import MAX_BARREN_ATTEMPTS, MAX_MIGRATIONS, native_events
from orchestrator.types import ExpertsUnavailable, GenerationParams, GenerationRequest


class Expert:
    """Each attempt yields `per_attempt[i]` tokens, then is lost (or finishes once max_tokens is reached)."""

    def __init__(self, per_attempt: list[int]) -> None:
        self.per_attempt = per_attempt
        self.requests = []

    async def generate(self, req):
        self.requests.append(req)
        n = self.per_attempt[min(len(self.requests), len(self.per_attempt)) - 1]
        for i in range(min(n, req.max_tokens)):
            last = i == req.max_tokens - 1
            yield GenerateDelta(req.request_id, (100 + len(req.prompt_ids) + i,), (-0.1,),
                                finish_reason="length" if last else None)
            if last:
                return
        yield GenerateDelta(req.request_id, error="expert code unavailable (TimeoutError)", error_kind="unavailable")


def _req(max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest("r", (1, 2), GenerationParams(max_tokens=max_tokens, temperature=0.0), model="code")


async def _run(expert) -> list[int]:
    return [ev.token_id async for ev in native_events(expert, "code", _req(), 4096)]


async def test_a_hung_expert_fails_after_two_barren_attempts_not_after_every_migration() -> None:
    expert = Expert([0])
    with pytest.raises(ExpertsUnavailable, match="not answering"):
        await _run(expert)
    assert len(expert.requests) == MAX_BARREN_ATTEMPTS < MAX_MIGRATIONS + 1


async def test_a_lost_generation_continues_from_the_tokens_it_had() -> None:
    expert = Expert([2, 0, 3, 5])                    # lost after 2, a barren attempt, lost after 3, then done
    tokens = await _run(expert)
    assert len(tokens) == 6 and len(expert.requests) == 4
    assert [len(r.prompt_ids) for r in expert.requests] == [2, 4, 4, 7]     # prompt + tokens so far
    assert [r.max_tokens for r in expert.requests] == [6, 4, 4, 1]


async def test_tokens_between_losses_reset_the_barren_count_but_migrations_stay_bounded() -> None:
    expert = Expert([1, 0, 1, 0, 1])
    with pytest.raises(ExpertsUnavailable):
        await _run(expert)
    assert len(expert.requests) == MAX_MIGRATIONS + 1
