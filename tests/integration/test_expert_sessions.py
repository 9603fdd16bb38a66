"""Decode sessions on real vLLM experts behind Ray Serve: catch-up, scoring, batching and session lifecycle.

Every comparison is between two computations of the same positions by the same engine (tolerance by dtype).
"""

from __future__ import annotations

import uuid

import pytest

from experts.protocol import SessionStep, TopK
from experts.tokenizer_check import check_shared_tokenizer, tokenizer_fingerprint
from tests.integration.conftest import EXPERT_NAMES, MAX_MODEL_LEN, SAMPLE_TEXTS

pytestmark = pytest.mark.integration
K = 10


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def assert_close(a: TopK, b: TopK, tol: float, where: str) -> None:
    """Same logprob for every id both top-k lists contain, and the same top-1 unless it is a near tie."""
    common = dict(zip(b.token_ids, b.logprobs))
    shared = [(t, lp) for t, lp in zip(a.token_ids, a.logprobs) if t in common]
    assert len(shared) >= len(a.token_ids) // 2, f"{where}: top-k lists barely overlap"
    for t, lp in shared:
        assert abs(lp - common[t]) <= tol, f"{where}: token {t} {lp:.5f} vs {common[t]:.5f}"
    if a.token_ids[0] != b.token_ids[0]:
        assert abs(a.logprobs[0] - b.logprobs[0]) <= tol, f"{where}: top-1 differs"


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_catch_up_equals_stepping_every_token(name, expert_clients, tokenize, tolerance):
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    client, tol = expert_clients[name], tolerance[name]
    tokens = tokenize(SAMPLE_TEXTS[name])[:30]
    prompt, skipped = tokens[:5], tokens[5:17]
    every, caught_up, fresh = new_id("every"), new_id("catchup"), new_id("fresh")

    await client.open([SessionStep(every, tuple(prompt)), SessionStep(caught_up, tuple(prompt))], K)
    for t in skipped:  # only `every` is chosen for these tokens
        (out_every,) = await client.advance([SessionStep(every, (t,))], K)
    (out_caught,) = await client.advance([SessionStep(caught_up, tuple(skipped))], K)
    (out_fresh,) = await client.open([SessionStep(fresh, tuple(prompt + skipped))], K)

    assert out_every.length == out_caught.length == out_fresh.length == len(prompt) + len(skipped)
    assert_close(out_caught.topk, out_every.topk, tol, f"{name} catch-up vs every token")
    assert_close(out_fresh.topk, out_every.topk, tol, f"{name} fresh prompt vs every token")
    # After catching up both sessions continue identically.
    nxt = tokens[17:20]
    outs = await client.advance([SessionStep(every, tuple(nxt)), SessionStep(caught_up, tuple(nxt))], K)
    assert_close(outs[0].topk, outs[1].topk, tol, f"{name} after catch-up")
    await client.close([every, caught_up, fresh])


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_score_agrees_with_stepping(name, expert_clients, tokenize, tolerance):
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    client, tol = expert_clients[name], tolerance[name]
    tokens = tokenize(SAMPLE_TEXTS[name])[:24]
    sid, prompt_len = new_id("vs-score"), 4
    (scored,) = await client.score([tokens], K)
    assert scored.error is None and scored.token_ids == tuple(tokens)

    (out,) = await client.open([SessionStep(sid, tuple(tokens[:prompt_len]))], K)
    stepped = [out.topk]
    for t in tokens[prompt_len:-1]:
        (out,) = await client.advance([SessionStep(sid, (t,))], K)
        stepped.append(out.topk)
    await client.close([sid])

    for offset, step_topk in enumerate(stepped):
        j = prompt_len - 1 + offset  # row j predicts tokens[j + 1] from tokens[..j]
        assert_close(TopK.of(scored.topk_ids[j], scored.topk_logprobs[j]), step_topk, tol, f"{name} row {j}")
        target = dict(zip(step_topk.token_ids, step_topk.logprobs)).get(tokens[j + 1])
        if target is not None:
            assert abs(scored.target_logprobs[j] - target) <= tol


async def test_batched_sessions_match_single_sessions(expert_clients, tokenize, tolerance):
    """Many sessions in one call are computed independently (no cross-talk inside the engine batch)."""
    name, client = next(iter(expert_clients.items()))
    prompts = [tokenize(text)[: 6 + i] for i, text in enumerate(SAMPLE_TEXTS.values())]
    ids = [new_id(f"batch{i}") for i in range(len(prompts))]
    batched = await client.open([SessionStep(i, tuple(p)) for i, p in zip(ids, prompts)], K)
    for sid, prompt, out in zip(ids, prompts, batched):
        alone = new_id("alone")
        (single,) = await client.open([SessionStep(alone, tuple(prompt))], K)
        assert out.error is None and out.length == len(prompt)
        assert_close(out.topk, single.topk, tolerance[name], f"batched {sid}")
        await client.close([alone])
    advanced = await client.advance([SessionStep(i, (7,) * (n + 1)) for n, i in enumerate(ids)], K)
    assert [o.length for o in advanced] == [len(p) + n + 1 for n, p in enumerate(prompts)]
    await client.close(ids)


async def test_open_and_close_many_sessions_keeps_serving(expert_clients, assert_serves):
    client = next(iter(expert_clients.values()))
    before = await client.num_open_sessions()
    for round_ in range(6):
        ids = [new_id(f"many{round_}") for _ in range(40)]
        outs = await client.open([SessionStep(i, (3, 4, 5 + n % 50)) for n, i in enumerate(ids)], 5)
        assert all(o.error is None for o in outs), [o.error for o in outs if o.error][:3]
        outs = await client.advance([SessionStep(i, (9,)) for i in ids], 5)
        assert all(o.error is None and o.length == 4 for o in outs)
        await client.close(ids)
        assert await client.num_open_sessions() == before
    await assert_serves(client)


async def test_session_capacity_gives_a_clear_error(expert_clients, expert_config_by_name, assert_serves):
    name, client = next(iter(expert_clients.items()))
    capacity = expert_config_by_name[name].session_capacity()
    ids = [new_id("cap") for _ in range(capacity + 1)]
    outs = await client.open([SessionStep(i, (1, 2)) for i in ids], 3)
    assert all(o.error is None for o in outs[:capacity])
    assert "capacity" in outs[capacity].error and "max_num_seqs" in outs[capacity].error
    await client.close(ids)
    await assert_serves(client)


async def test_long_sequence_is_scored_in_windows(expert_clients, tokenize, tolerance):
    """Longer than max_model_len: every position gets a row; the first window's rows equal a plain score."""
    name, client = next(iter(expert_clients.items()))
    text = " ".join(SAMPLE_TEXTS.values())
    tokens = (tokenize(text) * 20)[: 2 * MAX_MODEL_LEN + 17]
    long_out, head_out = await client.score([tokens, tokens[: MAX_MODEL_LEN - 1]], 5)
    assert long_out.error is None, long_out.error
    assert len(long_out.target_logprobs) == len(tokens) - 1
    for j in range(MAX_MODEL_LEN - 2):
        assert abs(long_out.target_logprobs[j] - head_out.target_logprobs[j]) <= tolerance[name]


async def test_info_describes_the_checkpoint(expert_clients, expert_config_by_name):
    import json
    from pathlib import Path

    infos = [await c.info() for c in expert_clients.values()]
    for info in infos:
        cfg = expert_config_by_name[info.name]
        hf = json.loads((Path(cfg.model_path) / "config.json").read_text())
        assert info.vocab_size == hf["vocab_size"] and info.max_model_len == cfg.max_model_len
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(cfg.model_path)
        assert info.eos_token_id is None or 0 <= info.eos_token_id < info.vocab_size
    # The demo experts share one tokenizer: the startup check passes.
    assert check_shared_tokenizer(infos) == infos[0].tokenizer_fingerprint


async def test_concurrent_open_advance_score_calls(expert_clients, tokenize, tolerance):
    """The orchestrator's batcher issues open, advance and score calls to one expert at the same time."""
    import asyncio

    name, client = next(iter(expert_clients.items()))
    tokens = tokenize(SAMPLE_TEXTS["code"])[:12]
    stepping = [new_id("conc") for _ in range(4)]
    await client.open([SessionStep(s, tuple(tokens[:6])) for s in stepping], K)
    fresh = [new_id("conc-open") for _ in range(4)]
    opened, advanced, (scored,) = await asyncio.gather(
        client.open([SessionStep(s, tuple(tokens[:7])) for s in fresh], K),
        client.advance([SessionStep(s, (tokens[6],)) for s in stepping], K),
        client.score([tokens[:8]], K),
    )
    expected = TopK.of(scored.topk_ids[6], scored.topk_logprobs[6])  # row 6: the prediction after tokens[:7]
    for out in opened + advanced:
        assert out.error is None and out.length == 7
        assert_close(out.topk, expected, tolerance[name], f"concurrent {out.session_id}")
    await client.close(stepping + fresh)
