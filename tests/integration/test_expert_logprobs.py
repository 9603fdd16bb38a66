"""The vLLM expert's step logprobs are the checkpoint's own: they match a transformers MixtralForCausalLM forward.

Engines run in float32 (every row within 1e-3 nats) except one bf16 expert (aggregate bounds, see
assert_rows_match).
"""

from __future__ import annotations

import uuid

import pytest

from experts.protocol import SessionStep, TopK
from tests.integration.conftest import EXPERT_NAMES, SAMPLE_TEXTS

pytestmark = pytest.mark.integration
K = 20


@pytest.fixture(scope="module")
def hf_logprobs(expert_config_by_name):
    """(name, tokens) -> [T, V] float32 log-softmax of the transformers forward of that checkpoint."""
    import torch
    from transformers import MixtralForCausalLM

    models: dict[str, MixtralForCausalLM] = {}

    def forward(name: str, tokens: list[int]):
        if name not in models:
            path = expert_config_by_name[name].model_path
            models[name] = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = models[name](torch.tensor([tokens])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return forward


def row_mismatch(topk: TopK, ref_row, tol: float) -> str | None:
    """Why one top-k row disagrees with the reference row (None if it agrees): a logprob off by more than
    tol, or a reference token clearly inside the top-k that the expert left out."""
    assert len(topk.token_ids) == K
    assert list(topk.logprobs) == sorted(topk.logprobs, reverse=True), "top-k not descending"
    for tid, lp in zip(topk.token_ids, topk.logprobs):
        if abs(lp - float(ref_row[tid])) > tol:
            return f"token {tid}: vllm {lp:.5f} vs hf {float(ref_row[tid]):.5f}"
    if abs(topk.logprobs[0] - float(ref_row.max())) > tol:
        return "top-1 logprob differs"
    ref_vals, ref_ids = ref_row.topk(K)
    missing = [int(i) for v, i in zip(ref_vals, ref_ids) if float(v) > topk.logprobs[-1] + tol
               and int(i) not in topk.token_ids]
    return f"reference top-k tokens {missing} missing" if missing else None


def assert_rows_match(rows: list[tuple[TopK, object]], tol: float, dtype: str, where: str) -> None:
    """float32: every row within tol (vLLM matches transformers to ~1e-5 nats here).

    bfloat16 has no per-row bound for a MoE: where the router's 2nd and 3rd expert nearly tie, bf16 rounding
    can flip the top-2 choice at that position, and every later position attends to it. On a CI rebuild of the
    demo json expert 10 of 29 rows moved by more than 0.15 nats (one by 2.6) while the same test passed on
    another build. So bf16 is held to aggregate bounds over all rows instead: the top-1 token agrees on >= 80%
    of rows and the top-1 logprob moves by <= 0.15 nats on average. Measured on 36 sequences of the local
    build: agreement >= 97% per sequence and mean |d| 0.004-0.037. A real bug (weights, rope, KV cache)
    gives agreement near chance and errors of nats.
    """
    if dtype == "float32":
        bad = [(j, why) for j, (topk, ref) in enumerate(rows) if (why := row_mismatch(topk, ref, tol))]
        assert not bad, f"{where}: {len(bad)}/{len(rows)} rows disagree, e.g. {bad[:3]}"
        return
    for topk, _ in rows:
        assert len(topk.token_ids) == K and list(topk.logprobs) == sorted(topk.logprobs, reverse=True)
    agree = sum(topk.token_ids[0] == int(ref.argmax()) for topk, ref in rows) / len(rows)
    err = sum(abs(topk.logprobs[0] - float(ref[topk.token_ids[0]])) for topk, ref in rows) / len(rows)
    assert agree >= 0.8 and err <= 0.15, f"{where}: bf16 top-1 agreement {agree:.2f}, mean |d top-1| {err:.3f}"


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_step_logprobs_match_transformers_forward(name, expert_clients, expert_config_by_name, tokenize,
                                                       hf_logprobs, tolerance):
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    client, tol = expert_clients[name], tolerance[name]
    tokens = tokenize(SAMPLE_TEXTS[name])[:32]
    ref = hf_logprobs(name, tokens)
    sid = f"hf-{uuid.uuid4().hex[:8]}"
    prompt_len = 6

    (out,) = await client.open([SessionStep(sid, tuple(tokens[:prompt_len]))], K)
    assert out.error is None, out.error
    rows = [(out.topk, ref[prompt_len - 1])]
    for pos in range(prompt_len, len(tokens)):
        (out,) = await client.advance([SessionStep(sid, (tokens[pos],))], K)
        assert out.error is None and out.length == pos + 1, out
        rows.append((out.topk, ref[pos]))
    await client.close([sid])
    assert_rows_match(rows, tol, expert_config_by_name[name].dtype, f"{name} stepping")


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_score_matches_transformers_forward(name, expert_clients, expert_config_by_name, tokenize,
                                                  hf_logprobs, tolerance):
    """Every domain's sample through every expert, all in one score() call."""
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    sequences = [tokenize(text)[:32] for text in SAMPLE_TEXTS.values()]
    dtype, tol = expert_config_by_name[name].dtype, tolerance[name]
    rows, target_err = [], []
    for tokens, scored in zip(sequences, await expert_clients[name].score(sequences, K)):
        assert scored.error is None, scored.error
        assert len(scored.topk_ids) == len(scored.target_logprobs) == len(tokens) - 1
        ref = hf_logprobs(name, tokens)
        rows += [(TopK.of(scored.topk_ids[j], scored.topk_logprobs[j]), ref[j]) for j in range(len(tokens) - 1)]
        target_err += [abs(scored.target_logprobs[j] - float(ref[j, tokens[j + 1]])) for j in range(len(tokens) - 1)]
    assert_rows_match(rows, tol, dtype, f"{name} score")
    if dtype == "float32":
        assert max(target_err) <= tol, f"{name}: target logprobs off by up to {max(target_err):.2e}"
    else:
        assert sum(target_err) / len(target_err) <= 0.15, f"{name}: mean target logprob error {target_err}"


async def test_logprobs_are_a_log_softmax(expert_clients, tokenize):
    """Raw model log-probabilities (logprobs_mode=raw_logprobs): top-k mass <= 1, top-1 mass meaningful."""
    import math

    client = next(iter(expert_clients.values()))
    (out,) = await client.score([tokenize(SAMPLE_TEXTS["prose"])[:16]], K)
    for row in out.topk_logprobs:
        assert all(lp <= 0.0 for lp in row)
        assert sum(math.exp(lp) for lp in row) <= 1.0 + 1e-4
