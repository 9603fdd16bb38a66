"""vLLM's engine in the expert's own process (experts/inproc_engine.py), on a real demo expert.

The engine is built in this test process (an in-process engine starts in a few seconds, no Ray needed): what
the Serve replicas run on CPU. The session and generation paths read vLLM's raw outputs (logprob arrays, no
output processor), so these tests check what that path must still do: free every engine request it started,
and give the same numbers as vLLM's own output processor.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from experts.config import ExpertConfig
from experts.protocol import GenerateRequest, SessionStep
from tests.integration.conftest import demo_expert_dir, require_demo


@pytest.fixture(scope="module")
def expert():
    require_demo()
    from experts.vllm_expert import VLLMExpert

    config = ExpertConfig(name="code", model_path=str(demo_expert_dir("code")), dtype="float32", max_model_len=256,
                          kv_cache_space_gib=0.25, engine_process="inproc")
    ex = VLLMExpert(config)
    yield ex
    ex.shutdown()


async def test_the_engine_runs_in_this_process(expert) -> None:
    from experts.inproc_engine import InprocEngine

    assert isinstance(expert.engine, InprocEngine)
    await expert.check_health()


async def test_the_engines_gloo_polling_threads_run_only_on_idle_cores(expert) -> None:
    """vLLM's gloo groups start polling threads even for one process; they must not preempt the engine thread."""
    import os

    from experts.thread_priority import scheduling_policies

    policies = scheduling_policies()
    assert policies, "no gloo_tcp_loop thread in this process: vLLM changed, revisit experts/thread_priority.py"
    assert set(policies) == {os.SCHED_IDLE}, policies


async def test_the_engine_thread_runs_below_the_threads_that_relay_its_results(expert) -> None:
    """The replica's event loop (here: this test's thread, same process) must preempt the engine thread."""
    import os
    import threading

    from experts.thread_priority import ENGINE_NICE_INCREMENT, MAX_NICE

    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    engine_nice = os.getpriority(os.PRIO_PROCESS, expert.engine.thread_id)
    assert engine_nice == min(MAX_NICE, loop_nice + ENGINE_NICE_INCREMENT), (engine_nice, loop_nice)
    assert engine_nice > loop_nice or loop_nice == MAX_NICE


async def test_the_engines_rms_norms_run_vllms_cpp_kernels_not_the_native_op_chain(expert) -> None:
    """experts/cpu_norm.py: every norm of a real session step goes to the `cpu_c` provider (counted at the
    providers themselves), and the step's numbers stay those of the native chain (float32 here)."""
    from vllm import ir

    from experts.cpu_norm import PROVIDER
    from experts.demo.model_config import DemoModelArgs

    calls: dict[tuple[str, str], int] = {}
    ops = (ir.ops.rms_norm, ir.ops.fused_add_rms_norm)
    originals = {(op.name, p): op.impls[p].impl_fn for op in ops for p in (PROVIDER, "native")}

    def counted(key, fn):
        def run(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return fn(*args, **kwargs)
        return run

    async def step(sid: str) -> list:
        (opened,) = await expert.open([SessionStep(sid, (5, 17, 300, 42))], 8)
        (advanced,) = await expert.advance([SessionStep(sid, (9,))], 8)
        await expert.close([sid])
        assert opened.error is None and advanced.error is None, (opened, advanced)
        return [dict(zip(o.topk.token_ids, o.topk.logprobs)) for o in (opened, advanced)]

    for (name, provider), fn in originals.items():
        next(op for op in ops if op.name == name).impls[provider].impl_fn = counted((name, provider), fn)
    try:
        with_kernels = await step("norm-kernels")
    finally:
        for (name, provider), fn in originals.items():
            next(op for op in ops if op.name == name).impls[provider].impl_fn = fn
    layers = DemoModelArgs().num_hidden_layers    # a forward: 1 plain norm, 2 x layers fused with the residual add
    assert calls.get(("rms_norm", PROVIDER), 0) == 2, calls
    assert calls.get(("fused_add_rms_norm", PROVIDER), 0) == 2 * 2 * layers, calls
    assert not any(n for (_, p), n in calls.items() if p == "native"), calls

    with ir.ops.rms_norm.set_priority(["native"]), ir.ops.fused_add_rms_norm.set_priority(["native"]):
        native = await step("norm-native")
    for got, expected in zip(with_kernels, native):
        assert set(got) == set(expected), (got, expected)
        assert max(abs(got[t] - expected[t]) for t in got) < 1e-4, (got, expected)


_COMPILED_BEFORE_READY = """
import sys
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from vllm.v1.sample.ops.logprobs import batched_count_greater_than
from experts.config import ExpertConfig
from experts.inproc_engine import InprocEngine

code = batched_count_greater_than._torchdynamo_orig_callable.__code__
assert not _debug_get_cache_entry_list(code), "compiled before any engine existed"
config = ExpertConfig(name="code", model_path=sys.argv[1], dtype="float32", max_model_len=256,
                      kv_cache_space_gib=0.25, engine_process="inproc")
engine = InprocEngine(config.engine_args(), threads=1)
print(len(_debug_get_cache_entry_list(code)))
engine.shutdown()
"""


def test_a_new_engine_has_compiled_vllms_logprob_function_before_it_says_it_is_ready() -> None:
    """vLLM torch.compiles its logprob-rank function on the first step that asks for logprobs (≈ 1.7 s of CPU):
    the engine does that step while it starts, so no request waits for it. A fresh process, so that no other
    engine of this test session has compiled it already."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _COMPILED_BEFORE_READY, str(demo_expert_dir("code"))],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 1, out.stdout


async def test_closed_sessions_and_ended_generations_leave_no_request_in_the_engine(expert) -> None:
    engine = expert.engine
    assert await engine.requests_held() == 0
    ids = [f"held-{i}" for i in range(8)]
    opened = await expert.open([SessionStep(sid, (5 + i, 6, 7, 8)) for i, sid in enumerate(ids)], 5)
    assert all(o.error is None for o in opened), opened
    for t in range(3):
        stepped = await expert.advance([SessionStep(sid, (9 + t,)) for sid in ids], 5)
        assert all(o.error is None for o in stepped), stepped
    assert await engine.requests_held() == 8              # paused sessions keep their request
    await expert.close(ids)
    assert await engine.requests_held() == 0

    # A generation its consumer stops early (a client that went away) is aborted in the engine too.
    stream = expert.generate(GenerateRequest("cut", (5, 6, 7), max_tokens=200, temperature=1.0, top_p=1.0,
                                             ignore_eos=True))
    first = await anext(stream)
    assert first.error is None and first.token_ids, first
    await stream.aclose()
    assert await engine.requests_held() == 0


async def test_an_answer_for_a_caller_that_is_gone_or_a_failing_model_function_leaves_the_engine_running(
        expert) -> None:
    """The engine thread answers each command on its caller's event loop. A caller whose loop has closed (its
    replica thread ended) and a model function that raises, even a BaseException, are that caller's problem:
    the thread that steps every session of the replica must go on."""
    engine = expert.engine
    gone = asyncio.new_event_loop()
    answer = gone.create_future()
    gone.close()
    engine._put(("count", answer, gone))
    engine._put(("model", lambda model: None, gone.create_future(), gone))

    def exits(model):
        raise SystemExit("a fault-injection function that exits")

    with pytest.raises(SystemExit):
        await engine.on_model(exits)
    assert await engine.requests_held() == 0            # answered after all three: the thread is alive
    await engine.check_health()


async def test_raw_session_logprobs_equal_vllms_output_processor(expert) -> None:
    """The session path reads logprob arrays; scoring goes through vLLM's output processor (logprob dicts).
    Same context, same model: the same top-k, in float32 to the last digit."""
    tokens = [5, 17, 300, 42, 9, 1000, 7]
    (opened,) = await expert.open([SessionStep("same", tuple(tokens[:3]))], 8)
    steps = [opened]
    for t in tokens[3:]:
        (out,) = await expert.advance([SessionStep("same", (t,))], 8)
        steps.append(out)
    await expert.close(["same"])
    (scored,) = await expert.score([tokens], 8)
    for row, step in zip(range(2, len(tokens) - 1), steps):      # scored row j predicts tokens[j + 1]
        assert step.error is None, step
        expected = dict(zip(scored.topk_ids[row], scored.topk_logprobs[row]))
        got = dict(zip(step.topk.token_ids, step.topk.logprobs))
        assert set(got) == set(expected), (row, got, expected)
        assert max(abs(got[t] - expected[t]) for t in got) < 1e-4, (row, got, expected)


async def test_concurrent_sessions_from_many_tasks_all_get_answers(expert) -> None:
    ids = [f"many-{i}" for i in range(24)]

    async def one(sid: str, i: int) -> None:
        (o,) = await expert.open([SessionStep(sid, (3 + i, 4, 5))], 4)
        assert o.error is None, o
        for t in range(5):
            (o,) = await expert.advance([SessionStep(sid, (10 + t,))], 4)
            assert o.error is None and len(o.topk.token_ids) == 4, o
        await expert.close([sid])

    await asyncio.wait_for(asyncio.gather(*(one(sid, i) for i, sid in enumerate(ids))), 120)
    assert await expert.engine.requests_held() == 0


async def test_batched_opens_and_advances_are_one_engine_command_each_with_the_numbers_of_a_generate_stream(expert):
    """VLLMExpert.open starts every new session in one command (InprocEngine.open_sessions) and advance hands
    every open session's next chunk to the engine in one command (feed_sessions). Same contexts stepped the old
    way, one generate() stream and one Session.feed each: the same top-k, to the last digit, catch-up chunks
    of several tokens included."""
    from experts.vllm_engine import step_params

    prompts = [(5 + i, 6, 7, 8 + i) for i in range(6)]
    feeds = [[(11,), (12, 13, 14), (15,)] for _ in prompts]
    batched, single = [f"b{i}" for i in range(6)], [f"s{i}" for i in range(6)]
    engine = expert.engine
    steps = engine.steps
    opened = await expert.open([SessionStep(sid, p) for sid, p in zip(batched, prompts)], 6)
    assert all(o.error is None for o in opened), opened
    assert engine.steps == steps + 1                             # one command, one step for all six prompts
    streamed = [await expert.sessions.open(sid).feed(list(p), step_params(6)) for sid, p in zip(single, prompts)]
    assert [o.topk for o in opened] == streamed
    for t in range(3):
        commands = engine.feeds
        got = await expert.advance([SessionStep(sid, f[t]) for sid, f in zip(batched, feeds)], 6)
        assert engine.feeds == commands + 1                      # one command for the whole batch
        want = [await expert.sessions.get(sid).feed(list(f[t]), step_params(6)) for sid, f in zip(single, feeds)]
        assert [o.error for o in got] == [None] * 6, got
        assert [o.topk for o in got] == want
        assert [o.length for o in got] == [expert.sessions.get(sid).length for sid in single]
    await expert.close(batched + single)
    assert await engine.requests_held() == 0


async def test_sessions_that_advance_every_step_keep_their_batch_rows_with_the_numbers_of_vllms_own_path(expert):
    """Sessions fed in consecutive engine steps are updated where they sit in vLLM's persistent batch
    (experts/session_rows.py), instead of being taken out and added back with their whole context. The same
    sessions, chunks and batches again with vLLM's remove-and-add path for every chunk: the same top-k, bit for
    bit until a session sits out (then to float32 rounding, see below). Covered: catch-up chunks of several tokens, a chunk that crosses KV-cache blocks, and a session
    that sits out one step (vLLM's path once), then rejoins with a catch-up chunk."""
    from experts import session_rows

    block = expert.engine._engine.vllm_config.cache_config.block_size
    prompts = [(5 + i, 6, 7, 8 + i) for i in range(4)]
    chunks = [(11,), (12, 13, 14), tuple(range(20, 21 + block)), (15,), (16,), (17,), (18,)]
    skip = 4                                                 # at this chunk, session 0 sits out

    async def run(prefix: str) -> tuple[dict, int]:
        ids = [f"{prefix}{i}" for i in range(4)]
        assert all(o.error is None for o in await expert.open([SessionStep(s, p) for s, p in zip(ids, prompts)], 6))
        before, out = session_rows.in_place_updates, {}
        for t, chunk in enumerate(chunks):
            steps = {i: chunk for i in range(4) if (t, i) != (skip, 0)}
            if t == skip + 1:
                steps[0] = chunks[skip] + chunk              # session 0 catches up on the chunk it missed
            rows = sorted(steps)
            out.update(zip(((t, i) for i in rows),
                           await expert.advance([SessionStep(ids[i], steps[i]) for i in rows], 6)))
        await expert.close(ids)
        return out, session_rows.in_place_updates - before

    got, kept = await run("rows-kept-")
    assert kept == 4 * len(chunks) - 2, kept                 # all but the chunk skipped and the one after it
    session_rows.enabled = False
    try:
        want, taken = await run("rows-vllm-")
    finally:
        session_rows.enabled = True
    assert taken == 0
    assert sorted(got) == sorted(want)
    for (t, i), w in want.items():
        g = got[(t, i)]
        assert g.error is None and w.error is None, ((t, i), g, w)
        assert (g.topk.token_ids, g.length) == (w.topk.token_ids, w.length), (t, i)
        if t < skip:                                         # the same rows in the same places: bit for bit
            assert g.topk.logprobs == w.topk.logprobs, (t, i)
        else:   # once a row sat out, the two paths order the batch's rows differently (vLLM condenses the
            # batch by moving its last row into the gap); float32 sums then differ in the last bits
            assert g.topk.logprobs == pytest.approx(w.topk.logprobs, abs=1e-5), (t, i)
    assert await expert.engine.requests_held() == 0


async def test_a_batched_advance_keeps_row_order_and_fails_only_the_bad_rows(expert):
    (ok,) = await expert.open([SessionStep("order-ok", (5, 6, 7))], 4)
    assert ok.error is None
    out = await expert.advance([SessionStep("order-unknown", (8,)), SessionStep("order-ok", (8,)),
                                SessionStep("order-ok2", (9,))], 4)
    assert [o.session_id for o in out] == ["order-unknown", "order-ok", "order-ok2"]
    assert out[0].error_kind == "input" and out[2].error_kind == "input"
    assert out[1].error is None and len(out[1].topk.token_ids) == 4
    await expert.close(["order-ok"])
    assert await expert.engine.requests_held() == 0


async def test_a_cancelled_batched_advance_closes_its_sessions_and_the_engine_serves_on(expert):
    """The caller gives up while the engine steps (a client that went away, a timed-out call): the sessions of
    that call are closed in the engine and the next call is answered."""
    ids = [f"cancel-{i}" for i in range(8)]
    opened = await expert.open([SessionStep(sid, (5 + i, 6, 7)) for i, sid in enumerate(ids)], 4)
    assert all(o.error is None for o in opened)
    posted = expert.engine.feeds
    task = asyncio.ensure_future(expert.advance([SessionStep(sid, (9,)) for sid in ids], 4))
    while expert.engine.feeds == posted:                            # until the command is with the engine
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(expert.sessions.get(sid) is None for sid in ids)
    assert await expert.engine.requests_held() == 0                 # counted after the aborts the close posted
    (again,) = await expert.open([SessionStep("after-cancel", (5, 6))], 4)
    (stepped,) = await expert.advance([SessionStep("after-cancel", (7,))], 4)
    assert again.error is None and stepped.error is None
    await expert.close(["after-cancel"])


async def test_a_session_closed_while_its_batched_advance_waits_never_fails_the_call(expert):
    ids = ["race-a", "race-b"]
    opened = await expert.open([SessionStep(sid, (5, 6, 7)) for sid in ids], 4)
    assert all(o.error is None for o in opened)
    task = asyncio.ensure_future(expert.advance([SessionStep(sid, (8,)) for sid in ids], 4))
    await asyncio.sleep(0)                                   # advance validated both rows; its engine call waits
    await expert.close(["race-a"])
    a, b = await task                                        # no exception: the call itself stands
    assert a.error is None or a.error_kind == "engine", a    # its answer, or its session's end; never a crash
    assert b.error is None and len(b.topk.token_ids) == 4, b
    await expert.close(["race-b"])
    assert await expert.engine.requests_held() == 0


async def stall(seconds: float) -> None:
    """Block the event loop's thread without holding the GIL (as a descheduled thread would)."""
    time.sleep(seconds)  # noqa: ASYNC251 - the point: the loop thread stalls


async def test_an_open_and_an_advance_asked_in_one_loop_turn_reach_the_engine_in_that_turn(expert):
    """A round asks an expert to open the sessions it lacks and to advance the others: two calls, asked in one
    event-loop turn. Both engine commands reach the engine together, so the round waits for one engine step,
    not two, even when the loop's thread stalls between the two calls (here: a task between them that sleeps
    50 ms without the GIL, time for the engine thread to wake and step on whatever was queued). (The opens used
    to reach the engine a few loop turns later, through a task per session and a feeder task per generate()
    stream; later each call queued its command at once, and under load the engine sometimes stepped between
    the two.)"""
    engine = expert.engine
    old = [f"turn-old-{i}" for i in range(4)]
    opened = await expert.open([SessionStep(sid, (5 + i, 6, 7)) for i, sid in enumerate(old)], 4)
    assert all(o.error is None for o in opened), opened
    for attempt in range(3):
        new = [f"turn-new-{attempt}-{i}" for i in range(2)]
        prompts = [SessionStep(sid, tuple(range(20, 60))) for sid in new]
        if attempt == 2:                         # a refused row (a token outside the vocabulary) changes nothing
            prompts.insert(1, SessionStep("turn-refused", (10**6,)))
        steps, opens, feeds = engine.output_steps, engine.opens, engine.feeds
        opening = asyncio.ensure_future(expert.open(prompts, 4))
        stalling = asyncio.ensure_future(stall(0.05))
        advancing = asyncio.ensure_future(expert.advance([SessionStep(sid, (9 + attempt,)) for sid in old], 4))
        await asyncio.sleep(0)                   # one loop turn: both calls run until they first wait
        assert stalling.done()
        assert (engine.opens, engine.feeds) == (opens + 1, feeds + 1), "a command was not posted in the turn"
        fresh, stepped = await asyncio.gather(opening, advancing)
        assert [o.session_id for o in fresh] == [p.session_id for p in prompts]
        if attempt == 2:
            assert fresh.pop(1).error_kind == "input"
        assert all(o.error is None for o in fresh + stepped), (fresh, stepped)
        # Steps with outputs: vLLM also takes an empty step after requests end (aborts, a refused row) to
        # release their ids, and when that one falls inside this window depends on the machine's load.
        took = engine.output_steps - steps
        assert took == 1, f"the open and the advance took {took} engine steps"
        await expert.close(new)
    await expert.close(old)
    assert await engine.requests_held() == 0


async def test_calls_queued_when_the_engine_thread_dies_get_engine_errors_instead_of_waiting_forever():
    """The engine thread stops on an error (here a malformed command, which raises on the real thread and goes
    through its real error handler). Opens and advances already queued behind it, or posted after it, are
    answered: an "engine" error per row, never a call left waiting (its sessions would stay busy, out of the
    idle reaper's reach) and never a failed call."""
    from experts.inproc_engine import EngineDead
    from experts.vllm_expert import VLLMExpert

    config = ExpertConfig(name="code", model_path=str(demo_expert_dir("code")), dtype="float32", max_model_len=256,
                          kv_cache_space_gib=0.25, engine_process="inproc")
    doomed = VLLMExpert(config)                  # its own engine: this test stops it
    try:
        engine = doomed.engine
        (old,) = await doomed.open([SessionStep("dies-old", (5, 6, 7))], 4)
        assert old.error is None, old
        engine._commands.put(("malformed",))     # raises on the engine thread, which then stops
        opening = asyncio.ensure_future(doomed.open([SessionStep("dies-new", (5, 6))], 4))
        advancing = asyncio.ensure_future(doomed.advance([SessionStep("dies-old", (8,))], 4))
        fresh, stepped = await asyncio.wait_for(asyncio.gather(opening, advancing), 60)
        assert [o.error_kind for o in fresh + stepped] == ["engine", "engine"], (fresh, stepped)
        assert engine.error is not None
        (later,) = await doomed.open([SessionStep("dies-later", (5,))], 4)
        assert later.error_kind == "engine", later
        with pytest.raises(EngineDead):
            await engine.requests_held()
    finally:
        doomed.shutdown()
