"""The engine's prober brings a down expert back when it answers again: within the probe timeout (the same
bound a step has before it marks an expert down), and each down expert on its own (a hung one does not hold
back another's return). In-process experts whose `info` is slow or hangs on purpose."""

import asyncio

from orchestrator.engine import EnsembleEngine
from tests.fakes import DeterministicExpert

NAMES = ["code", "prose"]


class ProbedExpert(DeterministicExpert):
    """`info` answers at once while `delay_s` is 0; otherwise it is a probe: answered after `delay_s`, or never
    (None)."""

    def __init__(self, name: str, seed: int) -> None:
        super().__init__(name, seed)
        self.delay_s: float | None = 0.0
        self.probes = 0
        self.probed = asyncio.Event()

    async def info(self):
        if self.delay_s != 0.0:
            self.probes += 1
            self.probed.set()
            if self.delay_s is None:
                await asyncio.Event().wait()          # hung: only the prober's timeout ends this
            await asyncio.sleep(self.delay_s)         # the slow replica itself, not a wait of the test
        return await super().info()


async def started(probe_timeout_s: float):
    experts = {n: ProbedExpert(n, seed=i) for i, n in enumerate(NAMES)}
    engine = EnsembleEngine(experts, None, top_k=2, logprobs_k=8, probe_interval_s=0.05,
                            probe_timeout_s=probe_timeout_s)
    await engine.start()
    back = {e: asyncio.Event() for e in range(len(NAMES))}
    answered = engine.health.answered

    def answered_and_signal(e: int) -> None:
        answered(e)
        back[e].set()

    engine.health.answered = answered_and_signal
    return engine, experts, back


async def test_a_down_expert_answering_slower_than_a_second_but_within_the_timeout_comes_back():
    engine, experts, back = await started(probe_timeout_s=10.0)
    try:
        experts["code"].delay_s = 1.5            # a loaded replica: slow, but as fast as steps may be
        engine.health.failed(0, "a step timed out")
        async with asyncio.timeout(8):
            await back[0].wait()
        assert engine.health.down() == []
        assert experts["code"].probes == 1       # one probe, waited out: not cut short and repeated
    finally:
        await engine.stop()


async def test_a_hung_expert_does_not_hold_back_another_experts_return():
    engine, experts, back = await started(probe_timeout_s=30.0)
    try:
        experts["code"].delay_s = None           # hung, for longer than this test
        engine.health.failed(0, "a step timed out")
        async with asyncio.timeout(5):
            await experts["code"].probed.wait()  # code's probe is in flight ...
        engine.health.failed(1, "its replica died")   # ... when prose goes down too, and answers at once
        async with asyncio.timeout(5):
            await back[1].wait()
        assert engine.health.down() == [0] and experts["code"].probes == 1   # code's probe still waits
    finally:
        await engine.stop()


async def test_a_hung_expert_stays_down_and_is_probed_again_after_the_timeout():
    engine, experts, back = await started(probe_timeout_s=0.3)
    try:
        experts["code"].delay_s = None
        engine.health.failed(0, "a step timed out")
        for _ in range(2):                       # the timeout ends each probe; the next round sends another
            async with asyncio.timeout(5):
                await experts["code"].probed.wait()
            experts["code"].probed.clear()
        assert experts["code"].probes >= 2 and engine.health.down() == [0] and not back[0].is_set()
    finally:
        await engine.stop()
