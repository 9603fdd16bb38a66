"""A generation stopped on the replica without its caller asking (lease reaper, shutdown) tells the caller,
so a caller that is in fact alive does not wait forever (experts/generations.py)."""

from __future__ import annotations

import asyncio
import time

from experts.generations import Generations
from experts.protocol import GenerateRequest


class SlowEngine:
    async def generate(self, prompt, params, request_id):
        await asyncio.Event().wait()            # never produces a token
        yield None


def _req(rid: str) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_ids=(1, 2), max_tokens=4)


async def test_reaped_generations_end_with_an_error_delta_but_aborted_ones_do_not(monkeypatch) -> None:
    monkeypatch.setattr("experts.generations.generation_params", lambda req: None)
    gens = Generations(SlowEngine(), lease_s=30.0)
    gens.start("a", _req("kept-waiting"))
    gens.start("a", _req("aborted"))
    await asyncio.sleep(0)
    assert await gens.poll("a", ["aborted"], 0.0) == []
    await asyncio.sleep(0)
    gens._last_poll["a"] = time.monotonic() - 31          # caller a has not polled for longer than its lease
    gens.start("b", _req("other"))                          # any start runs the reaper
    for _ in range(100):
        if len(gens) == 1:
            break
        await asyncio.sleep(0)
    deltas = gens._outbox.get("a", [])
    assert [d.request_id for d in deltas] == ["kept-waiting"] and deltas[0].error_kind == "unavailable"
    gens.abort_all()
