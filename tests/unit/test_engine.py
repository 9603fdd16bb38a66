"""The decode loop over deterministic in-process experts: routing, catch-up, batching, determinism."""

import asyncio

import pytest
import torch

from gating.mix import gate_weights, logprob_of, mix
from gating.model import Gate, GateArgs
from gating.runtime import GateRuntime
from orchestrator.engine import EnsembleEngine
from orchestrator.request_checks import RequestRejected
from orchestrator.types import GenerationParams, GenerationRequest
from tests.fakes import DeterministicExpert, context_logprobs, topk_of

NAMES = ["code", "prose", "math", "json"]
V = 64


def make_engine(gate_seed: int | None = 0, top_k: int = 2, **kw):
    experts = {n: DeterministicExpert(n, seed=i, vocab=V) for i, n in enumerate(NAMES)}
    gate = None
    if gate_seed is not None:
        torch.manual_seed(gate_seed)
        gate = GateRuntime(Gate(GateArgs(V, len(NAMES), 8, 16)), "gate-test", NAMES, top_k, "logits")
    return EnsembleEngine(experts, gate, top_k=top_k, logprobs_k=8, **kw), experts


async def collect(engine, req):
    return [ev async for ev in engine.generate(req)]


def req(rid="r", prompt=(0, 5, 6, 7), model="ensemble", **params):
    return GenerationRequest(rid, tuple(prompt), GenerationParams(**{"max_tokens": 12, "ignore_eos": True, **params}),
                             model)


async def started(**kw):
    engine, experts = make_engine(**kw)
    await engine.start()
    return engine, experts


async def test_max_tokens_respected_and_routing_on_every_token():
    engine, _ = await started()
    events = await collect(engine, req(max_tokens=7))
    assert len(events) == 7 and events[-1].finish_reason == "length"
    for ev in events:
        assert len(ev.routing.experts) == 2 and sum(ev.routing.weights) == pytest.approx(1.0)
        assert set(ev.routing.experts) <= set(NAMES)


async def test_temperature_zero_is_deterministic_and_seed_reproduces():
    engine, _ = await started()
    greedy = [[e.token_id for e in await collect(engine, req(f"g{i}", temperature=0.0))] for i in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [[e.token_id for e in await collect(engine, req(f"s{i}", temperature=1.0, seed=7))] for i in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("space", ["logits", "probs"])
async def test_each_token_is_sampled_from_the_routed_mix_of_the_full_context(space):
    """Recompute every step from scratch (experts' distribution of the whole context): catch-up is exact.
    The engine mixes in the space its gate was trained for (the runtime's), whatever its own default."""
    engine, experts = await started()
    engine.set_gate(GateRuntime(engine._gate.gate, "gate-space", NAMES, 2, space))
    prompt = [0, 9, 10]
    events = await collect(engine, req(prompt=prompt, temperature=0.0, max_tokens=15))
    context = list(prompt)
    for ev in events:
        idx = [NAMES.index(n) for n in ev.routing.experts]
        tops = [topk_of(context_logprobs(experts[NAMES[i]].seed, context, V), 8) for i in idx]
        ids = torch.tensor([[t.token_ids for t in tops]])
        lps = torch.tensor([[t.logprobs for t in tops]], dtype=torch.float64)     # the served mix is float64
        mixed = mix(ids, lps, torch.tensor([ev.routing.weights], dtype=torch.float64), V, space)
        best = int(mixed.cand_ids[0][mixed.cand_logprobs[0].argmax()])
        assert ev.token_id == best
        assert ev.logprob == pytest.approx(float(logprob_of(mixed, torch.tensor([best]))[0]), abs=1e-5)
        context.append(ev.token_id)
    switched = {ev.routing.experts for ev in events}
    assert len(switched) > 1, "test needs routing changes to exercise catch-up"


async def test_sampled_tokens_come_from_the_reported_mix_tail_included():
    """At temperature 1 a token outside every selected expert's top-k is drawn as often as the mix says (its
    tail mass), and its reported logprob is the mix's: sampled tokens and logprobs share one distribution."""
    engine, experts = await started()
    expected_tail, drawn_tail, n = 0.0, 0, 0
    for r in range(6):
        prompt = [0, 20 + r, 30 + r]
        events = await collect(engine, req(f"t{r}", prompt=prompt, temperature=1.0, seed=r, max_tokens=40))
        context = list(prompt)
        for ev in events:
            idx = [NAMES.index(name) for name in ev.routing.experts]
            tops = [topk_of(context_logprobs(experts[NAMES[i]].seed, context, V), 8) for i in idx]
            mixed = mix(torch.tensor([[t.token_ids for t in tops]]),
                        torch.tensor([[t.logprobs for t in tops]], dtype=torch.float64),     # the served mix's dtype
                        torch.tensor([ev.routing.weights], dtype=torch.float64), V, "logits")
            union = set(mixed.cand_ids[0].tolist())
            expected_tail += 1.0 - float(torch.where(mixed.first, mixed.cand_logprobs.exp(), 0.0).sum())
            drawn_tail += ev.token_id not in union
            n += 1
            assert ev.logprob == pytest.approx(float(logprob_of(mixed, torch.tensor([ev.token_id]))[0]), abs=1e-5)
            context.append(ev.token_id)
    sd = max(expected_tail * (1 - expected_tail / n), 1.0) ** 0.5
    assert expected_tail > 5, "the experts' top-8 must leave mass outside the candidates for this test"
    assert abs(drawn_tail - expected_tail) < 4 * sd, (drawn_tail, expected_tail, n)


@pytest.mark.parametrize("model", ["ensemble", "code"])
async def test_top_k_one_samples_the_best_token_like_greedy(model):
    """top_k reaches the sampler of the mix and the single-expert fast path: top_k=1 at temperature 1 is greedy."""
    engine, _ = await started()
    greedy = [e.token_id for e in await collect(engine, req("g", temperature=0.0, model=model))]
    for seed in range(3):
        events = await collect(engine, req(f"k{seed}", temperature=1.0, top_k=1, seed=seed, model=model))
        assert [e.token_id for e in events] == greedy
    sampled = {tuple(e.token_id for e in await collect(engine, req(f"s{s}", temperature=1.0, seed=s, model=model)))
               for s in range(3)}
    assert sampled != {tuple(greedy)}                  # without top_k the same seeds do sample


async def test_sessions_are_closed_after_the_request():
    engine, experts = await started()
    await collect(engine, req(max_tokens=5))
    for _ in range(2000):                        # closing runs in a side task: wait for it, bounded
        if all(not e.sessions for e in experts.values()):
            break
        await asyncio.sleep(0.001)
    assert all(not e.sessions for e in experts.values())


async def test_concurrent_streams_share_round_trips():
    """16 streams x 10 tokens x 2 experts = 320 session steps; batched rounds need far fewer expert calls."""
    engine, experts = await started()
    reqs = [req(f"c{i}", prompt=(0, i + 2), max_tokens=10, temperature=0.0) for i in range(16)]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    assert all(len(r) == 10 for r in results)
    steps = sum(len(ev.routing.experts) for r in results for ev in r)
    calls = sum(e.calls for e in experts.values())
    assert steps == 320
    assert calls < steps / 4, f"{calls} round trips for {steps} steps: steps are not being batched"


async def test_expert_work_counts_prompt_opens_joins_and_advances_as_the_routing_implies():
    """What /metrics and the bench report as the experts' work, checked against each token's routing: the first
    token's experts open with the prompt, an expert the gate first picks later joins with the whole context,
    and one picked again advances by every token it missed."""
    engine, _ = await started()
    prompt = (0, 5, 6, 7)
    events = await collect(engine, req(prompt=prompt, max_tokens=24, temperature=1.0, seed=3))
    expected: dict[tuple[str, str], int] = {}
    synced: dict[str, int] = {}
    for t, ev in enumerate(events):
        context = len(prompt) + t
        for name in ev.routing.experts:
            kind = "advance" if name in synced else ("join" if t else "prompt")
            expected[kind, "rows"] = expected.get((kind, "rows"), 0) + 1
            expected[kind, "tokens"] = expected.get((kind, "tokens"), 0) + context - synced.get(name, 0)
            synced[name] = context
    assert expected.get(("join", "rows")), "this seed's gate never brings in a third expert: pick another"
    assert engine.expert_work() == expected


def fake_clock(monkeypatch) -> list[float]:
    """The decode loop's and the phase clock's time: a microsecond per reading, plus what a test adds to now[0]."""
    now = [0.0]

    def clock() -> float:
        now[0] += 1e-6
        return now[0]

    monkeypatch.setattr("orchestrator.decode_loop.time.perf_counter", clock)
    monkeypatch.setattr("orchestrator.profile.time.perf_counter", clock)
    return now


async def test_an_admission_rounds_wait_is_kept_apart_from_the_running_rounds_phases(monkeypatch):
    """A new request's prefill runs beside the main rounds; its expert wait must not count as per-token time.
    A fake clock: a prefill of the prompt takes 100 s of it, every other call none. One request at a time, so
    that no main round is running while the clock jumps."""
    now = fake_clock(monkeypatch)
    engine, experts = await started()
    for e in experts.values():
        opening = e.open

        async def slow_open(steps, top_k, _open=opening):
            if any(len(s.token_ids) == 2 for s in steps):          # the prompt alone: admission
                now[0] += 100.0
            return await _open(steps, top_k)

        e.open = slow_open
    for i in range(3):
        assert len(await collect(engine, req(f"a{i}", prompt=(0, i + 2), max_tokens=6))) == 6
    seconds = engine.clock.seconds
    assert seconds["admit_expert"] >= 100.0 and seconds["admit"] >= 100.0
    assert seconds["expert"] < 1.0 and seconds["rpc"] < 1.0 and seconds["round"] < 1.0, seconds


async def test_the_gates_step_is_clocked_as_gate_work_not_as_emitting_events(monkeypatch):
    """The GRU step over each round's new tokens is the gate's work: it counts in gate_step (part of the
    orchestration share), not in emit. A fake clock: each gate step takes 100 s of it, nothing else takes any."""
    now = fake_clock(monkeypatch)
    engine, _ = await started()
    stepping = GateRuntime.step

    def slow_step(self, *args, **kwargs):
        now[0] += 100.0
        return stepping(self, *args, **kwargs)

    monkeypatch.setattr(GateRuntime, "step", slow_step)
    assert len(await collect(engine, req(max_tokens=6))) == 6
    seconds = engine.clock.seconds
    # after the first token (its admission round's), then after tokens 2-5 (main rounds); not after the last
    assert seconds["admit_gate_step"] >= 100.0 and seconds["gate_step"] >= 400.0, seconds
    assert seconds["emit"] < 1.0 and seconds["gate"] < 1.0, seconds
    from deploy.bench.report import orchestration_share
    assert orchestration_share(seconds) > 0.9


async def test_the_experts_are_asked_for_the_next_token_before_the_reader_handles_the_last_one():
    """The readers' work (detokenise, SSE) must overlap the experts' step, not delay the call that starts it:
    each round's expert calls are written before the reader of the previous round's token runs."""
    engine, experts = await started()
    prompt = (0, 5, 6, 7)
    seen: list = []
    asked: list[tuple[int, int]] = []          # (tokens generated that this advance carries, events read by then)
    for e in experts.values():
        async def advance(steps, top_k, _advance=e.advance, _e=e):
            for st in steps:
                asked.append((len(_e.sessions[st.session_id]) + len(st.token_ids) - len(prompt), len(seen)))
            return await _advance(steps, top_k)

        e.advance = advance
    async for ev in engine.generate(req(prompt=prompt, max_tokens=10)):
        seen.append(ev)
    later = [(made, read) for made, read in asked if made >= 2]   # the first token is delivered at admission
    assert len(seen) == 10 and len(later) >= 8
    assert all(read == made - 1 for made, read in later), later


@pytest.mark.parametrize("fan_out", [False, True])
async def test_a_rounds_opens_and_advances_are_all_asked_before_their_readers_handle_the_last_token(fan_out):
    """With several streams an expert often opens one row (its first time in that sequence) and advances
    others in the same round: both calls, on every expert, must be written before the readers of the previous
    round's tokens run. (Before, such an expert's two calls were gathered in a task of their own, which asyncio
    ran after the readers: its advance left ≈ 13 ms late at c=32 on the demo.) fan_out: each call first starts
    a task of its own, as the Serve client does for an expert with several replicas (one call per replica);
    the loop wakes the readers late enough for those to be written too."""
    engine, experts = await started()
    prompts = {f"r{i}": (0, 5 + i, 6 + 2 * i, 7) for i in range(6)}
    seen: dict[str, int] = dict.fromkeys(prompts, 0)
    # (expert, kind, round, request, tokens generated that the call carries, events its reader had read)
    asked: list[tuple[str, str, int, str, int, int]] = []

    def recording(e, kind):
        original = getattr(e, kind)

        async def ask(steps, top_k):
            for st in steps:
                rid = st.session_id.rsplit(".", 2)[0]
                had = 0 if kind == "open" else len(e.sessions[st.session_id])
                made = had + len(st.token_ids) - len(prompts[rid])
                asked.append((e.name, kind, engine._loop.rounds, rid, made, seen[rid]))
            return await original(steps, top_k)

        async def fanned(steps, top_k):
            (out,) = await asyncio.gather(ask(steps, top_k))
            return out
        return fanned if fan_out else ask

    for e in experts.values():
        for kind in ("open", "advance"):
            setattr(e, kind, recording(e, kind))

    async def read(rid: str) -> None:          # seeded: which expert first joins a sequence when is the same each run
        async for _ in engine.generate(req(rid, prompt=prompts[rid], max_tokens=16, seed=int(rid[1:]))):
            seen[rid] += 1

    await asyncio.gather(*(read(rid) for rid in prompts))
    later = [a for a in asked if a[4] >= 2]                  # the first token is delivered at admission
    assert all(n == 16 for n in seen.values())
    assert all(read_ == made - 1 for *_, made, read_ in later), later
    calls = {(name, rnd, kind) for name, kind, rnd, *_ in later}
    assert any((name, rnd, "advance") in calls for name, rnd, kind in calls if kind == "open"), \
        "the test needs an expert that opens a row mid-sequence and advances others in the same round"


async def test_single_expert_model_uses_only_that_expert():
    engine, experts = await started()
    events = await collect(engine, GenerationRequest("m", (0, 4), GenerationParams(max_tokens=5), model="math"))
    assert len(events) == 5
    assert all(ev.routing.experts == ("math",) and ev.routing.weights == (1.0,) for ev in events)
    assert experts["code"].calls == 0


async def test_single_expert_fast_path_and_stepping_agree_at_temperature_zero():
    """model=<expert> is decoded by the expert's own engine (native path); a seeded request on an engine that
    cannot seed is stepped in lockstep instead. Greedy, both give that expert's argmax text."""
    engine, _ = await started()
    native = await collect(engine, GenerationRequest("n", (0, 4), GenerationParams(max_tokens=8, temperature=0.0,
                                                                                   ignore_eos=True), model="json"))
    engine.infos[3].extra["native_seed"] = False
    stepped = await collect(engine, GenerationRequest("s", (0, 4), GenerationParams(max_tokens=8, temperature=0.0,
                                                                                    seed=3, ignore_eos=True),
                                                      model="json"))
    assert [e.token_id for e in native] == [e.token_id for e in stepped]
    for a, b in zip(native, stepped):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


async def test_stop_tokens_end_generation():
    engine, _ = await started()
    free = await collect(engine, req(temperature=0.0))
    stop = free[3].token_id
    events = await collect(engine, req(temperature=0.0, stop_token_ids=(stop,)))
    assert events[-1].token_id == stop and events[-1].finish_reason == "stop"
    assert len(events) == next(i for i, e in enumerate(free) if e.token_id == stop) + 1


@pytest.mark.parametrize(
    "request_, message, param, code",
    [
        (GenerationRequest("x", (), GenerationParams()), "empty", "prompt", None),
        (GenerationRequest("x", (0, 999), GenerationParams()), "outside the vocabulary", "prompt", None),
        (GenerationRequest("x", (0, 1), GenerationParams(max_tokens=1000)), "maximum context length", "max_tokens",
         "context_length_exceeded"),
        (GenerationRequest("x", (0, 1), GenerationParams(), model="nope"), "does not exist", "model", "model_not_found"),
        (GenerationRequest("x", (0, 1), GenerationParams(), experts_per_token=9), r"must be in \[1, ",
         "experts_per_token", "invalid_parameter"),
        (GenerationRequest("x", (0, 1), GenerationParams(), model="code", experts_per_token=1), "applies to model",
         "experts_per_token", "invalid_parameter"),
    ],
)
async def test_bad_requests_are_rejected_with_clear_errors(request_, message, param, code):
    """The engine refuses them itself (orchestrator/request_checks.py), whoever calls it: the gateway maps the
    same refusal to an OpenAI error with this param and code (tests/unit/test_hostile_input.py)."""
    engine, _ = await started()
    with pytest.raises(RequestRejected, match=message) as info:
        await collect(engine, request_)
    assert (info.value.param, info.value.code) == (param, code)


async def test_echo_scores_match_the_generation_path():
    engine, _ = await started()
    events = await collect(engine, req(prompt=(0, 3, 4), temperature=0.0, max_tokens=6))
    tokens = [0, 3, 4] + [e.token_id for e in events]
    scored = await engine.score("e", tokens, "ensemble")
    assert scored[0][0] is None
    for ev, (lp, _) in zip(events, scored[3:]):
        assert lp == pytest.approx(ev.logprob, abs=1e-4)


def routed_by(gate: GateRuntime, context: list[int], k: int = 2) -> tuple[str, ...]:
    experts, _ = gate_weights(gate.sequence_logits(context)[-1:], k)
    return tuple(NAMES[i] for i in experts[0].tolist())


async def test_gate_swap_keeps_running_requests_on_their_version():
    """Every token of a request that started before a swap is routed by the old gate, not the new one."""
    engine, _ = await started()
    old = engine._gate
    prompt = [0, 5, 6, 7]
    gen = engine.generate(req(prompt=prompt, max_tokens=12, temperature=0.0))
    first = await gen.__anext__()
    torch.manual_seed(9)
    new = GateRuntime(Gate(GateArgs(V, 4, 8, 16)), "gate-new", NAMES, 2, "logits")
    engine.set_gate(new)
    events = [first] + [ev async for ev in gen]
    assert len(events) == 12 and engine.gate_version == "gate-new"
    context, differs = list(prompt), 0
    for ev in events:
        assert ev.routing.experts == routed_by(old, context)
        differs += routed_by(new, context) != routed_by(old, context)
        context.append(ev.token_id)
    assert differs > 0, "the two gates route alike here: the test would not see a swap"
    after = await collect(engine, req("after", prompt=prompt, max_tokens=4, temperature=0.0))
    assert after[0].routing.experts == routed_by(new, prompt)
