"""A generation stopped on the replica without its caller asking (lease reaper, shutdown) tells the caller,
so a caller that is in fact alive does not wait forever (experts/generations.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

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


class GatedEngine:
    """Produces one (non-raw) output per `go` event: a token each time the test lets it."""

    def __init__(self) -> None:
        self.go = asyncio.Queue()

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace

        while True:
            token = await self.go.get()
            out = SimpleNamespace(token_ids=[token], logprobs=None, finish_reason=None)
            yield SimpleNamespace(outputs=[out], finished=False)


async def test_a_new_poll_ends_the_callers_previous_waiting_poll_so_no_delta_goes_to_a_dead_reply(monkeypatch) -> None:
    """A poll whose connection was lost is still waiting on the replica; the caller polls again on a new
    connection. Left waiting, the old poll would take the next delta and drop it with its reply."""
    monkeypatch.setattr("experts.generations.generation_params", lambda req: None)
    engine = GatedEngine()
    gens = Generations(engine, lease_s=30.0)
    gens.start("a", _req("g"))
    orphan = asyncio.ensure_future(gens.poll("a", [], 5.0))
    await asyncio.sleep(0)
    current = asyncio.ensure_future(gens.poll("a", [], 5.0))
    await asyncio.sleep(0)
    engine.go.put_nowait(7)
    deltas = await asyncio.wait_for(current, 5)
    assert [d.token_ids for d in deltas] == [(7,)]
    with pytest.raises(asyncio.CancelledError):
        await orphan
    gens.abort_all()
