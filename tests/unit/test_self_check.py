"""experts/self_check.py: a replica probes itself once when a step answers only non-finite logprobs, and calls
itself unsound (its health check then raises) only when the probe is unsound too."""

import asyncio
import math

from experts.protocol import StepOutput, TopK
from experts.self_check import SoundnessWatch, finite_top

SOUND = TopK.of([5, 7], [-0.1, -2.5])
NAN = TopK.of([0, 1], [math.nan, math.nan])
INF = TopK.of([0, 1], [-math.inf, -math.inf])


def out(topk, error=None):
    return StepOutput("s", topk=None if error else topk, error=error)


class Probe:
    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self):
        self.calls += 1
        await self.release.wait()
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_finite_top_logprob_is_read_from_the_packed_bytes():
    assert finite_top(SOUND) and not finite_top(NAN) and not finite_top(INF)
    assert not finite_top(TopK(b"", b""))


def test_a_step_with_any_finite_answer_starts_no_probe():
    async def run():
        probe = Probe()
        watch = SoundnessWatch(probe, "x")
        watch.observe([out(NAN), out(SOUND), out(NAN)])
        watch.observe([out(None, error="at capacity")])          # errors only: nothing to judge
        watch.observe([])
        await watch.settled()
        return probe.calls, watch.verdict

    assert asyncio.run(run()) == (0, None)


def test_a_replica_that_was_sound_and_whose_probe_is_unsound_too_is_marked_for_replacement():
    async def run():
        probe = Probe("non-finite logprob nan")
        watch = SoundnessWatch(probe, "x")
        watch.observe([out(SOUND)])                               # it served soundly, then its model went bad
        watch.observe([out(NAN), out(INF), out(None, error="input")])
        await watch.settled()
        watch.observe([out(NAN)])                                 # decided: no second probe
        await watch.settled()
        return probe.calls, watch.verdict

    calls, verdict = asyncio.run(run())
    assert calls == 1 and verdict is not None and "non-finite logprob nan" in verdict
    assert SoundnessWatch(Probe(), "y").state == ""


def test_a_replica_never_sound_is_not_replaced_its_checkpoint_is_the_suspect():
    """A new replica would load the same corrupt files: no restart loop. One probe, then no more."""
    async def run():
        probe = Probe("non-finite logprob nan")
        watch = SoundnessWatch(probe, "x")
        for _ in range(3):
            watch.observe([out(NAN)])
            await watch.settled()
        return probe.calls, watch.verdict, watch.state

    assert asyncio.run(run()) == (1, None, "suspect checkpoint: non-finite logprob nan")


def test_a_sound_probe_or_no_answer_leaves_the_replica_in_service_and_a_later_step_probes_again():
    async def run():
        probe = Probe(None, RuntimeError("engine stopping"), None)
        watch = SoundnessWatch(probe, "x")
        for _ in range(3):
            watch.observe([out(NAN)])
            await watch.settled()
        return probe.calls, watch.verdict

    assert asyncio.run(run()) == (3, None)


def test_one_probe_at_a_time():
    async def run():
        probe = Probe("nan")
        probe.release.clear()
        watch = SoundnessWatch(probe, "x")
        watch.observe([out(SOUND)])
        watch.observe([out(NAN)])
        await asyncio.sleep(0)                                    # the probe task starts and waits
        watch.observe([out(NAN)])
        watch.observe([out(INF)])
        probe.release.set()
        await watch.settled()
        return probe.calls, watch.verdict is not None

    assert asyncio.run(run()) == (1, True)
