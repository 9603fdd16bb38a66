"""experts/self_check.py: a replica probes itself once when a step answers only non-finite logprobs, and calls
itself unsound (its health check then raises) only when the probe is unsound too."""

import asyncio
import math

import pytest

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


def test_the_baseline_probe_tells_a_model_gone_bad_from_a_checkpoint_never_sound():
    """From the health check, before any watched step: a sound baseline makes a later unsound probe a verdict
    (replace); an unsound one makes the checkpoint the suspect; an unanswered one is tried again."""
    async def run(*answers, then_nan_step=False):
        probe = Probe(*answers)
        watch = SoundnessWatch(probe, "x")
        for _ in range(len(answers) if not then_nan_step else 1):
            watch.start_baseline()
            await watch.settled()
        if then_nan_step:
            watch.observe([out(NAN)])
            await watch.settled()
        watch.start_baseline()                                    # decided or sound: no more baseline probes
        await watch.settled()
        return probe.calls, watch.state.split(":")[0], watch.ever_sound

    assert asyncio.run(run(None, "nan", then_nan_step=True)) == (2, "replace", True)
    assert asyncio.run(run("nan")) == (1, "suspect checkpoint", False)
    assert asyncio.run(run(RuntimeError("busy"), None)) == (2, "", True)


class FakeExpert:
    """What ExpertServer._self_probe uses of VLLMExpert."""

    def __init__(self, answer: StepOutput, close_fails: bool = False):
        self.answer, self.close_fails, self.open_ids, self.closed = answer, close_fails, [], []

    async def info(self):
        from experts.protocol import ExpertInfo

        return ExpertInfo("code", "/m", 100, 256, "fp", 2)

    async def open(self, steps, top_k):
        self.open_ids += [s.session_id for s in steps]
        assert [s.token_ids for s in steps] == [(2,)] and top_k == 1       # the eos token, one candidate
        return [self.answer]

    async def close(self, ids):
        self.closed += ids
        if self.close_fails:
            raise RuntimeError("replica stopping")

    async def check_health(self):
        pass

    def shutdown(self):
        pass


def server_with(expert):
    import itertools
    import types

    from experts.server import ExpertServer

    server = object.__new__(ExpertServer)                          # no Serve, no engine: the probe and the check
    server._expert, server.replica, server._probe_ids = expert, "r1", itertools.count()
    server.config = types.SimpleNamespace(name="code")
    server._gauges = (None, None)
    server._publish = lambda: None
    server._soundness = SoundnessWatch(server._self_probe, "expert code replica r1")
    server._relay = "normal (a test: the runner's thread keeps its priority)"    # raised already: not again
    return server


def test_the_servers_probe_checks_the_answer_and_always_closes_its_session():
    import pytest

    async def run():
        nan = server_with(FakeExpert(StepOutput("p", topk=NAN, length=1), close_fails=True))
        why = await nan._self_probe()                              # a close that fails does not lose the verdict
        sound = server_with(FakeExpert(StepOutput("p", topk=TopK.of([5], [-0.2]), length=1)))
        fine = await sound._self_probe()
        diverged = await server_with(FakeExpert(StepOutput("p", topk=TopK.of([5], [-0.2]), length=3)))._self_probe()
        refused = server_with(FakeExpert(StepOutput("p", error="full", error_kind="capacity")))
        with pytest.raises(RuntimeError, match="refused"):
            await refused._self_probe()
        return why, nan._expert, fine, sound._expert, diverged, refused._expert

    why, nan, fine, sound, diverged, refused = asyncio.run(run())
    assert why is not None and "nan" in why.lower() and nan.closed == nan.open_ids
    assert fine is None and sound.closed == sound.open_ids
    assert diverged is not None and "3" in diverged
    assert refused.closed == []                                    # nothing was opened


def test_the_health_check_fails_once_a_replica_that_was_sound_is_found_unsound():
    import pytest

    async def run():
        server = server_with(FakeExpert(StepOutput("p", topk=NAN, length=1)))
        await server.check_health()                                # healthy; starts the baseline probe
        await server._soundness.settled()
        first = server._soundness.state                            # never sound: the checkpoint is the suspect
        await server.check_health()                                # ... and the replica stays
        server._soundness = SoundnessWatch(server._self_probe, "x")
        server._soundness.observe([out(SOUND)])
        server._soundness.observe([out(NAN)])
        await server._soundness.settled()
        with pytest.raises(RuntimeError, match="must be replaced"):
            await server.check_health()
        return first

    assert asyncio.run(run()).startswith("suspect checkpoint")


class OneLogprobEngine:
    """vLLM's (non-raw) generate: two tokens, each sampled with logprob `lp`."""

    def __init__(self, lp: float) -> None:
        self.lp = lp

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace

        for token in (3, 4):
            out = SimpleNamespace(token_ids=[token], logprobs=[{token: SimpleNamespace(logprob=self.lp)}],
                                  finish_reason="length" if token == 4 else None)
            yield SimpleNamespace(outputs=[out], finished=token == 4)


@pytest.mark.parametrize("lp", [math.nan, -math.inf, -0.7])
def test_a_native_generation_whose_tokens_have_no_finite_logprob_makes_the_replica_probe_itself(monkeypatch, lp):
    """The single-expert fast path, where vLLM decodes alone, is watched too: the replica's Generations hand each
    delta's logprobs to the watch (ExpertServer wires Generations.on_logprobs), and a sound-then-NaN model is
    marked for replacement as from a session step."""
    import vllm.inputs  # noqa: F401 - Generations._drive imports it; cold, ≈ 5 s

    from experts.generations import Generations
    from experts.protocol import GenerateRequest

    monkeypatch.setattr("experts.generations.generation_params", lambda req: None)

    async def run():
        probe = Probe("non-finite logprob nan")
        watch = SoundnessWatch(probe, "x")
        watch.observe([out(SOUND)])                               # it served soundly before
        gens = Generations(OneLogprobEngine(lp))
        gens.on_logprobs = watch.observe_generated
        gens.start("caller", GenerateRequest("g", (1, 2), max_tokens=2))
        seen = []
        while not any(d.final for d in seen):
            seen += await gens.poll("caller", [], 5.0)
        await watch.settled()
        return [d.logprobs for d in seen], probe.calls, watch.verdict

    logprobs, calls, verdict = asyncio.run(run())
    assert len(logprobs) == 2 and all(len(x) == 1 for x in logprobs), logprobs
    if math.isfinite(lp):
        assert (calls, verdict) == (0, None)
    else:
        assert calls == 1 and verdict is not None and "replaced" in verdict
