"""vLLM's engine in the expert's own process (experts/inproc_engine.py), on a real demo expert.

The engine is built in this test process (an in-process engine starts in a few seconds, no Ray needed): what
the Serve replicas run on CPU. The session and generation paths read vLLM's raw outputs (logprob arrays, no
output processor), so these tests check what that path must still do: free every engine request it started,
and give the same numbers as vLLM's own output processor.
"""

from __future__ import annotations

import asyncio

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
