"""An offline job whose Serve controller stops answering is stopped with a clear error (deploy/local_experts.py)."""

from __future__ import annotations

import asyncio

import pytest

from deploy import local_experts
from deploy.local_experts import ServeWatchdog


async def _job_under(watchdog_errors: list[str | None], monkeypatch) -> ServeWatchdog:
    answers = iter(watchdog_errors)
    monkeypatch.setattr(local_experts, "_controller_error", lambda timeout_s: next(answers, watchdog_errors[-1]))
    job = asyncio.get_running_loop().create_task(asyncio.Event().wait())     # a job that would wait forever
    dog = ServeWatchdog(job, period_s=0.01, grace_s=0.03)
    dog.start()
    with pytest.raises(asyncio.CancelledError):
        await job
    return dog


async def test_a_controller_that_stays_unreachable_stops_the_job_and_says_why(monkeypatch) -> None:
    dog = await _job_under([None, "RayActorError: the actor died"], monkeypatch)
    assert dog.lost and "RayActorError" in dog.lost


async def test_a_short_blip_is_forgiven(monkeypatch) -> None:
    answers = iter(["blip", None] * 50)
    monkeypatch.setattr(local_experts, "_controller_error", lambda timeout_s: next(answers, None))
    job = asyncio.get_running_loop().create_task(asyncio.sleep(0.3))
    dog = ServeWatchdog(job, period_s=0.01, grace_s=0.05)
    dog.start()
    await job
    dog.stop()
    assert dog.lost is None
