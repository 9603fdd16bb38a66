"""Unsound answers from an expert replica (a corrupt checkpoint answers NaN; vLLM raises nothing) fail only the
rows that got them: the expert counts as faulty, its rows keep their other expert, nothing unsound reaches a
client, and the expert stays down until a probe step is sound again. In-process experts that turn unsound on
purpose; tests/integration/test_gateway_unsound_expert.py does the same with a real corrupt checkpoint."""

import asyncio
import math

import msgspec
import numpy as np
import pytest

from experts.answer_checks import length_problem, score_problem, token_problem, topk_problems
from experts.protocol import SessionStep, StepOutput, TopK
from orchestrator.engine import EnsembleEngine
from orchestrator.types import ExpertsUnavailable, GenerationParams, GenerationRequest
from tests.fakes import DeterministicExpert, context_logprobs, topk_of

NAMES = ["code", "prose", "math"]
V = 64


def sound(k: int = 8) -> TopK:
    return topk_of(context_logprobs(0, [1, 2, 3], V), k)


UNSOUND = {     # what is wrong -> (the answer, what its problem says)
    "NaN logprobs": (TopK.of(range(8), [math.nan] * 8), "NaN logprobs (8 of 8)"),
    "outside the vocabulary": (TopK.of([V + 3, *range(7)], sound().lp_array), f"token id {V + 3} outside"),
    "below 0 is no id": (TopK.of([-1, *range(1, 8)], sound().lp_array), "token id -1 outside"),
    "listed twice": (TopK.of([5] * 8, sound().lp_array), "listed twice"),
    "above 0": (TopK.of(range(8), [2.0] * 8), "logprob 2 above 0"),
    "more than all the mass": (TopK.of(range(8), [-0.01] * 8), "probability mass 7.92 above 1"),
    "infinite logprobs": (TopK.of(range(8), [-0.01] + [-math.inf] * 7), "infinite logprobs"),
    "no candidates": (TopK.of([], []), "no candidates"),
}


@pytest.mark.parametrize("case", list(UNSOUND))
def test_each_kind_of_unsound_top_k_is_found_and_named_and_sound_ones_pass(case):
    answer, says = UNSOUND[case]
    problems = topk_problems([sound(), answer, sound()], V)
    assert list(problems) == [1], problems
    assert says in problems[1], problems


@pytest.mark.parametrize("case", [c for c in UNSOUND if c != "no candidates"])
def test_the_whole_round_check_fails_exactly_when_some_row_is_unsound(case):
    from experts.answer_checks import _all_sound, _bad_rows

    rows = [sound() for _ in range(40)]
    for block in (rows, rows[:20] + [UNSOUND[case][0]] + rows[20:]):
        ids, lps = np.stack([t.id_array for t in block]), np.stack([t.lp_array for t in block])
        assert _all_sound(ids, lps, V) == (not _bad_rows(ids, lps, V).any())
    assert not _all_sound(ids, lps, V)


def test_a_real_models_top_k_passes_whatever_its_shape():
    lp = context_logprobs(3, [4, 5], V)
    assert topk_problems([topk_of(lp, k) for k in (1, 8, V)], V) == {}
    assert topk_problems([topk_of(lp, 8)] * 40, V) == {}
    assert topk_problems([], V) == {}


def test_a_generated_tokens_logprob_must_be_finite_and_its_id_in_the_vocabulary():
    assert token_problem((3, 4), (-0.5, -1.0), V) is None
    assert "NaN" in token_problem((0,), (math.nan,), V)
    assert "outside the vocabulary" in token_problem((V,), (-0.5,), V)
    assert token_problem((0,), (-math.inf,), V) is not None
    assert token_problem((3,), (-0.5,), V, (((3, -0.5), (4, math.nan)),)) == "NaN logprob of a generated token"
    assert "outside the vocabulary" in token_problem((3,), (-0.5,), V, (((3, -0.5), (V, -2.0)),))


def test_a_score_names_its_first_unsound_position():
    good = sound()
    assert score_problem([good.token_ids] * 3, [good.logprobs] * 3, V) is None
    assert score_problem([good.token_ids] * 3, [good.logprobs, (math.nan,) * 8, good.logprobs], None) == \
        "position 1: NaN logprobs (8 of 8)"


def test_an_answer_must_be_for_exactly_the_tokens_sent():
    assert length_problem(7, 7) is None
    assert length_problem(6, 7) == "answer for a context of 6 tokens, not the 7 sent (the session diverged on the replica)"
    assert "diverged" in length_problem(8, 7)


class TurningExpert(DeterministicExpert):
    """Answers soundly until `unsound` is set, then with NaN logprobs (as vLLM does on a corrupt checkpoint);
    or, with `poison` set, only for contexts whose prompt has that token second. With `lose_advances` = n, the
    sessions of its next n advance calls lose their last token (a catch-up the replica applied in part): a sound
    distribution, for another context; with `lose_opens`, every open loses it too."""

    def __init__(self, name: str, seed: int) -> None:
        super().__init__(name, seed, vocab=V)
        self.unsound = False
        self.poison: int | None = None
        self.closed: list[str] = []
        self.lose_advances = 0
        self.lose_opens = False
        self.quarantined: list[str] = []

    def quarantine(self, replica: str, for_s: float = 60.0) -> None:
        self.quarantined.append(replica)

    async def open(self, steps, top_k):
        return await super().open(_losing(steps) if self.lose_opens else steps, top_k)

    async def advance(self, steps, top_k):
        if self.lose_advances > 0:
            self.lose_advances -= 1
            steps = _losing(steps)
        return await super().advance(steps, top_k)

    async def close(self, session_ids):
        self.closed += session_ids
        await super().close(session_ids)

    def _next(self, sid: str, k: int) -> StepOutput:
        out = super()._next(sid, k)
        if self.unsound or (self.poison is not None and self.sessions[sid][1] == self.poison):
            out = StepOutput(sid, TopK.of(out.topk.token_ids, [math.nan] * out.topk.k), length=out.length)
        return msgspec.structs.replace(out, replica=f"replica-of-{self.name}")


def _losing(steps: list[SessionStep]) -> list[SessionStep]:
    return [SessionStep(s.session_id, s.token_ids[:-1]) for s in steps]


def request(rid: str, model: str = "ensemble", max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(rid, (0, 5, 6, 7), GenerationParams(max_tokens=max_tokens, ignore_eos=True,
                                                                 temperature=0.0, top_logprobs=3), model)


async def started(**kw):
    experts = {n: TurningExpert(n, seed=i) for i, n in enumerate(NAMES)}
    engine = EnsembleEngine(experts, None, top_k=len(NAMES), logprobs_k=8, **kw)   # no gate: every expert, every token
    await engine.start()
    return engine, experts


async def test_an_expert_turning_unsound_mid_stream_fails_no_stream_and_emits_nothing_unsound():
    engine, experts = await started(probe_interval_s=3600)
    try:
        seen: list = []
        turned = asyncio.Event()

        async def stream(rid: str) -> list:
            events = []
            async for ev in engine.generate(request(rid)):
                events.append(ev)
                seen.append(ev)
                if len(seen) == 12 and not turned.is_set():      # mid-stream, sessions open on every expert
                    experts["math"].unsound = True
                    turned.set()
            return events

        runs = await asyncio.gather(*(stream(f"r{i}") for i in range(4)))
        assert turned.is_set()
        for events in runs:
            assert len(events) == 24 and events[-1].finish_reason == "length"
            for ev in events:
                assert math.isfinite(ev.logprob) and ev.top_logprobs and all(math.isfinite(lp) for _, lp in ev.top_logprobs)
        late = [ev for events in runs for ev in events[8:]]             # well after the turn, in every stream
        assert late and all("math" not in ev.routing.experts for ev in late), "math's unsound answers were mixed in"
        assert engine.health.down() == [NAMES.index("math")]
        assert "unsound answer" in engine.health.report()["experts"]["math"]["last_error"]
        assert engine._loop.unsound_answers > 0
        # Its replica is quarantined: the sessions re-opened after its bad answers avoid it (when it has siblings).
        assert set(experts["math"].quarantined) == {"replica-of-math"}
        assert not any(e.quarantined for n, e in experts.items() if n != "math")
        # The sessions whose answers were rejected are closed on the replica, not left to its reaper.
        await asyncio.sleep(0)
        assert experts["math"].closed and not experts["math"].sessions
    finally:
        await engine.stop()


async def test_an_unsound_expert_stays_down_until_a_probe_step_is_sound_again():
    engine, experts = await started(probe_interval_s=0.02)
    try:
        experts["math"].unsound = True
        await collect_all(engine, request("a", max_tokens=4))
        assert engine.health.down() == [NAMES.index("math")]
        probed = experts["math"].calls
        async with asyncio.timeout(10):
            while experts["math"].calls < probed + 3:            # three probes open a session ...
                await asyncio.sleep(0.02)
        assert engine.health.down() == [NAMES.index("math")]   # ... and each answer is unsound: still down
        experts["math"].unsound = False
        async with asyncio.timeout(10):
            while engine.health.down():
                await asyncio.sleep(0.02)
        assert not experts["math"].sessions                      # the probes closed their sessions
    finally:
        await engine.stop()


async def test_an_expert_unsound_on_one_context_only_stays_up_for_the_others():
    engine, experts = await started(probe_interval_s=3600)
    try:
        experts["math"].poison = 9
        poisoned = GenerationRequest("p", (0, 9, 6, 7), request("p").params, "ensemble")
        bad, good = await asyncio.gather(collect_all(engine, poisoned), collect_all(engine, request("g")))
        assert len(bad) == len(good) == 24
        assert all("math" not in ev.routing.experts for ev in bad)
        assert all("math" in ev.routing.experts for ev in good)     # math answered the other request throughout
        assert engine.health.down() == []
        assert experts["math"].quarantined == []                   # its replica answered soundly too: not quarantined
    finally:
        await engine.stop()


async def test_a_session_that_diverged_on_the_replica_is_reopened_and_the_stream_is_unchanged():
    engine, experts = await started(probe_interval_s=3600)
    try:
        reference = [ev.token_id for ev in await collect_all(engine, request("ref"))]
        experts["math"].lose_advances = 1
        calls = experts["math"].calls
        events = await collect_all(engine, request("div"))
        assert experts["math"].lose_advances == 0 and experts["math"].calls > calls + 2
        assert [ev.token_id for ev in events] == reference, "an answer for another context was mixed in"
        assert all("math" in ev.routing.experts for ev in events)      # re-opened in place: never left out
        assert engine._loop.unsound_answers == 1 and engine._loop.migrations == 1
        assert engine.health.down() == []
    finally:
        await engine.stop()


async def test_an_expert_whose_sessions_always_diverge_goes_down_and_each_probe_says_why_it_stays_down():
    engine, experts = await started(probe_interval_s=0.02)
    try:
        experts["math"].lose_opens, experts["math"].lose_advances = True, 10**6
        events = await collect_all(engine, request("a", max_tokens=8))
        assert len(events) == 8 and all("math" not in ev.routing.experts for ev in events)
        report = engine.health.report()["experts"]["math"]
        assert report["state"] == "down" and "diverged" in report["last_error"], report
        experts["math"].lose_opens, experts["math"].lose_advances, experts["math"].unsound = False, 0, True
        async with asyncio.timeout(10):                                 # the probes' answers are unsound now
            while "NaN" not in report["last_error"]:
                await asyncio.sleep(0.02)
                report = engine.health.report()["experts"]["math"]
        assert report["state"] == "down" and report["last_error"].startswith("unsound answer from the replica")
        assert report["failures"] == 1                                  # a failed probe is no new failure
        experts["math"].unsound = False
        async with asyncio.timeout(10):
            while engine.health.down():
                await asyncio.sleep(0.02)
    finally:
        await engine.stop()


async def test_the_single_expert_fast_path_relays_no_unsound_token_and_fails_with_a_503():
    engine, experts = await started(probe_interval_s=3600)
    try:
        orig = experts["prose"].generate

        async def unsound_generate(req):
            async for d in orig(req):
                yield type(d)(d.request_id, d.token_ids, tuple(math.nan for _ in d.logprobs), d.top_logprobs,
                              d.finish_reason)

        experts["prose"].generate = unsound_generate
        relayed = []
        with pytest.raises(ExpertsUnavailable, match="unsound answer"):
            async for ev in engine.generate(request("n", model="prose")):
                relayed.append(ev)
        assert relayed == []
    finally:
        await engine.stop()


async def collect_all(engine, req) -> list:
    return [ev async for ev in engine.generate(req)]



class UnsoundScorer(DeterministicExpert):
    async def score(self, sequences, top_k):
        outs = await super().score(sequences, top_k)
        return [type(o)(o.token_ids, o.topk_ids, tuple((math.nan,) * len(r) for r in o.topk_logprobs),
                        o.target_logprobs) for o in outs]


async def test_teacher_forced_scores_with_an_unsound_expert_fail_loudly_not_with_nan():
    from gating.scores import score_sequences

    experts = {"code": DeterministicExpert("code", 0, vocab=V), "prose": UnsoundScorer("prose", 1, vocab=V)}
    engine = EnsembleEngine(experts, None, top_k=2, logprobs_k=8)
    await engine.start()
    try:
        with pytest.raises(ExpertsUnavailable, match="expert prose: unsound answer from the replica: position 0: NaN"):
            await engine.score("e", [0, 5, 6, 7], "ensemble")             # echo: a 503, not NaN in the response
        assert len(await engine.score("c", [0, 5, 6, 7], "code")) == 4    # the sound expert alone still scores
    finally:
        await engine.stop()
    with pytest.raises(RuntimeError, match="expert prose answered a sequence of 4 tokens unsoundly"):
        await score_sequences(experts, [[0, 5, 6, 7]], 8)                 # eval and retraining: no fit on NaN
