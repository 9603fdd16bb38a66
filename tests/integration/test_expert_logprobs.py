"""The vLLM expert's step logprobs are the checkpoint's own: they match a transformers MixtralForCausalLM forward.

Engines run in float32 (tolerance 1e-3 nats) except one bf16 expert (bf16 tolerance), see conftest.TOLERANCE.
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


def assert_matches_reference(topk: TopK, ref_row, tol: float, where: str) -> None:
    """Every returned logprob equals the reference's for that id, and no clearly better token is missing."""
    assert len(topk.token_ids) == K, where
    assert list(topk.logprobs) == sorted(topk.logprobs, reverse=True), f"{where}: top-k not descending"
    for tid, lp in zip(topk.token_ids, topk.logprobs):
        assert abs(lp - float(ref_row[tid])) <= tol, f"{where}: token {tid} vllm {lp:.5f} vs hf {float(ref_row[tid]):.5f}"
    assert abs(topk.logprobs[0] - float(ref_row.max())) <= tol, f"{where}: top-1 logprob differs"
    kth = topk.logprobs[-1]
    ref_vals, ref_ids = ref_row.topk(K)
    missing = [int(i) for v, i in zip(ref_vals, ref_ids) if float(v) > kth + tol and int(i) not in topk.token_ids]
    assert not missing, f"{where}: reference top-k tokens {missing} missing from the expert's top-k"


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_step_logprobs_match_transformers_forward(name, expert_clients, tokenize, hf_logprobs, tolerance):
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    client, tol = expert_clients[name], tolerance[name]
    tokens = tokenize(SAMPLE_TEXTS[name])[:32]
    ref = hf_logprobs(name, tokens)
    sid = f"hf-{uuid.uuid4().hex[:8]}"
    prompt_len = 6

    (out,) = await client.open([SessionStep(sid, tuple(tokens[:prompt_len]))], K)
    assert out.error is None, out.error
    assert_matches_reference(out.topk, ref[prompt_len - 1], tol, f"{name} open")
    for pos in range(prompt_len, len(tokens)):
        (out,) = await client.advance([SessionStep(sid, (tokens[pos],))], K)
        assert out.error is None and out.length == pos + 1, out
        assert_matches_reference(out.topk, ref[pos], tol, f"{name} position {pos}")
    await client.close([sid])


@pytest.mark.parametrize("name", EXPERT_NAMES)
async def test_score_matches_transformers_forward(name, expert_clients, tokenize, hf_logprobs, tolerance):
    if name not in expert_clients:
        pytest.skip(f"expert {name} not built")
    tokens = tokenize(SAMPLE_TEXTS[name])[:32]
    ref = hf_logprobs(name, tokens)
    (scored,) = await expert_clients[name].score([tokens], K)
    assert scored.error is None, scored.error
    assert len(scored.topk_ids) == len(scored.target_logprobs) == len(tokens) - 1
    for j in range(len(tokens) - 1):
        topk = TopK(scored.topk_ids[j], scored.topk_logprobs[j])
        assert_matches_reference(topk, ref[j], tolerance[name], f"{name} score row {j}")
        assert abs(scored.target_logprobs[j] - float(ref[j, tokens[j + 1]])) <= tolerance[name]


async def test_logprobs_are_a_log_softmax(expert_clients, tokenize):
    """Raw model log-probabilities (logprobs_mode=raw_logprobs): top-k mass <= 1, top-1 mass meaningful."""
    import math

    client = next(iter(expert_clients.values()))
    (out,) = await client.score([tokenize(SAMPLE_TEXTS["prose"])[:16]], K)
    for row in out.topk_logprobs:
        assert all(lp <= 0.0 for lp in row)
        assert sum(math.exp(lp) for lp in row) <= 1.0 + 1e-4
