"""Request validation names the offending parameter; response builders render routing readably."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator import api, responses
from orchestrator.types import GateDecision, TokenEvent


def error_of(schema, body: dict) -> api.OpenAIError:
    with pytest.raises(ValidationError) as info:
        schema.model_validate(body)
    return api.error_from_validation(info.value)


@pytest.mark.parametrize("body, param", [
    ({"model": "ensemble", "prompt": "x", "n": 2}, "n"),
    ({"model": "ensemble", "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": "ensemble", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "ensemble", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "ensemble", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "ensemble", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "ensemble", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "ensemble", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "ensemble", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "ensemble", "prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x"}, "model"),
])
def test_completion_request_errors_name_the_parameter(body: dict, param: str) -> None:
    err = error_of(api.CompletionRequest, body)
    assert err.status == 400 and err.param == param and err.message.startswith(param)
    assert err.body()["error"].keys() == {"message", "type", "param", "code"}


def test_n_greater_than_one_is_a_clear_400() -> None:
    err = error_of(api.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3})
    assert "only n=1 is supported" in err.message


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None),
])
def test_chat_request_errors(body: dict, param: str | None) -> None:
    err = error_of(api.ChatCompletionRequest, body)
    assert err.status == 400
    if param:
        assert err.param is not None and err.param.startswith(param)


def test_prompt_forms_and_text_parts() -> None:
    assert api.CompletionRequest(model="m", prompt=["one"]).prompt == "one"
    assert api.CompletionRequest(model="m", prompt=[[1, 2, 3]]).prompt == [1, 2, 3]
    assert api.CompletionRequest(model="m", prompt=[1, 2]).prompt == [1, 2]
    msg = api.ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert msg.text() == "ab"


def test_unknown_fields_are_ignored_and_never_logged() -> None:
    req = api.CompletionRequest.model_validate({"model": "m", "prompt": "x", "api_key": "sk-123", "seed": 3})
    assert "api_key" not in req.log_params() and req.log_params()["seed"] == 3


def test_chat_log_params_keep_the_messages() -> None:
    req = api.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5)
    assert req.log_params()["messages"] == [{"role": "user", "content": "hi"}] and req.token_budget() == 5


def test_routing_is_heaviest_first_with_a_share_summary() -> None:
    events = [TokenEvent("r", 0, 7, -0.1, GateDecision(("prose", "code"), (0.25, 0.75), 0.6)),
              TokenEvent("r", 1, 8, -0.2, GateDecision(("code", "math"), (0.5, 0.5), 0.7))]
    routing = responses.routing_of(events, lambda t: f"t{t}", "gate-v3")
    dumped = routing.model_dump()
    assert list(dumped["tokens"][0]["experts"]) == ["code", "prose"]
    assert dumped["tokens"][0] == {"index": 0, "token": "t7", "experts": {"code": 0.75, "prose": 0.25}}
    assert dumped["share"] == {"code": 0.625, "math": 0.25, "prose": 0.125}
    assert responses.usage_of(5, events).expert_tokens == {"code": 2, "prose": 1, "math": 1}


def test_optional_extras_are_absent_not_null() -> None:
    choice = api.CompletionChoice(text="x").model_dump()
    assert "routing" not in choice and choice["logprobs"] is None and choice["finish_reason"] is None
    assert api.ChatDelta(content="hi").model_dump() == {"content": "hi"}
