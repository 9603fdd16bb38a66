"""The official openai client against the real application: completions, chat, streaming, per-expert models,
return_routing, echo scoring (equal to the offline evaluation of the same text)."""

from __future__ import annotations

import math

import openai
import pytest

pytestmark = pytest.mark.integration

PROMPT = "def fibonacci(n):\n"


def live_gate_version(gw) -> str:
    return (gw.gate_dir / "CURRENT").read_text().strip()


def test_models_lists_the_ensemble_and_every_expert(live_gateway) -> None:
    ids = [m.id for m in live_gateway.openai().models.list().data]
    assert ids == ["ensemble", *[e.name for e in live_gateway.config.experts]]


def test_completion_reports_usage_per_expert_and_the_gate_version(live_gateway) -> None:
    c = live_gateway.openai().completions.create(model="ensemble", prompt=PROMPT, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 8 and c.usage.total_tokens == c.usage.prompt_tokens + 8
    assert sum(c.usage.model_extra["expert_tokens"].values()) == 2 * 8
    assert c.system_fingerprint == live_gate_version(live_gateway)


def test_streamed_text_equals_the_non_streamed_text_for_a_seed(live_gateway) -> None:
    client = live_gateway.openai()
    params = {"model": "ensemble", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 11,
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**params).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **params))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_non_streaming_and_streaming(live_gateway) -> None:
    client = live_gateway.openai()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    r = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=8, temperature=0, seed=3)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=8, temperature=0,
                                            seed=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


@pytest.mark.parametrize("model", ["ensemble", "code"])
def test_top_k_reaches_the_mix_and_vllms_own_sampler(live_gateway, model) -> None:
    """top_k=1 at temperature 1 is greedy, through the mix's sampler (`ensemble`) and through vLLM's own
    (one expert's native path); a top_k the API refuses is a 400 that names it."""
    client = live_gateway.openai()
    params = {"model": model, "prompt": PROMPT, "max_tokens": 10}
    greedy = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **params).choices[0].text
    for seed in (1, 2):
        text = client.completions.create(temperature=1.0, seed=seed, extra_body={"ignore_eos": True, "top_k": 1},
                                         **params).choices[0].text
        assert text == greedy, (seed, text, greedy)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(extra_body={"top_k": -2}, **params)
    assert bad.value.body["param"] == "top_k"


@pytest.mark.parametrize("expert", ["code", "prose", "math", "json"])
def test_each_expert_alone_through_the_same_path(live_gateway, expert) -> None:
    c = live_gateway.openai().completions.create(model=expert, prompt=PROMPT, max_tokens=4, temperature=0,
                                                 extra_body={"ignore_eos": True, "return_routing": True})
    routing = c.choices[0].model_extra["routing"]
    assert c.model == expert and c.usage.model_extra["expert_tokens"] == {expert: 4}
    assert all(t["experts"] == {expert: 1.0} for t in routing["tokens"])


def test_return_routing_is_readable_per_token(live_gateway) -> None:
    r = live_gateway.openai().chat.completions.create(
        model="ensemble", messages=[{"role": "user", "content": "Solve 3x + 7 = 22."}], max_tokens=6,
        temperature=0, extra_body={"ignore_eos": True, "return_routing": True})
    routing = r.choices[0].model_extra["routing"]
    names = {e.name for e in live_gateway.config.experts}
    assert routing["gate_version"] == r.system_fingerprint and len(routing["tokens"]) == 6
    for i, tok in enumerate(routing["tokens"]):
        weights = list(tok["experts"].values())
        assert tok["index"] == i and isinstance(tok["token"], str) and set(tok["experts"]) <= names
        assert len(weights) == 2 and weights == sorted(weights, reverse=True) and math.isclose(sum(weights), 1, abs_tol=1e-3)


def test_echo_scoring_matches_the_offline_evaluation(live_gateway) -> None:
    """lm-eval style scoring through HTTP == gating.evaluate on the same experts and gate (what `ensemble eval` runs)."""
    import asyncio

    from experts.server import connect_experts
    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.evaluate import evaluate
    from gating.jobs import scored

    text = "The old lighthouse keeper climbed the stairs every evening, counting the steps as the sea grew dark."
    e = live_gateway.openai().completions.create(model="ensemble", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == text and lp.token_logprobs[0] is None
    http_ppl = math.exp(-sum(lp.token_logprobs[1:]) / (len(lp.token_logprobs) - 1))

    names = [x.name for x in live_gateway.config.experts]
    experts = connect_experts(names, app_name=live_gateway.app_name)

    async def offline():
        info = await experts[names[0]].info()
        ids = [_ids_of(live_gateway, text)]
        corpus = await scored(experts, ids, live_gateway.config.logprobs_k, None, info.tokenizer_fingerprint, "score")
        ckpt = load_checkpoint(resolve_gate_path(live_gateway.gate_dir))
        space = live_gateway.config.mix_space or ckpt.mix_space
        return evaluate(corpus, info.vocab_size, space, gate=ckpt.build())["perplexity"]

    ppl = asyncio.run(offline())
    assert http_ppl == pytest.approx(ppl[f"gate_top{live_gateway.config.top_k}"], rel=1e-3)
    code = live_gateway.openai().completions.create(model="code", prompt=text, max_tokens=0, echo=True, logprobs=1)
    code_lps = code.choices[0].logprobs.token_logprobs[1:]
    assert math.exp(-sum(code_lps) / len(code_lps)) == pytest.approx(ppl["expert:code"], rel=1e-3)


def _ids_of(gw, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gw.config.experts[0].model_path).encode(text, add_special_tokens=True)
