"""Request validation names the offending parameter and takes nothing the schema refuses; responses parse as
the `openai` package's own types; response builders render routing readably."""

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
    ({"model": "ensemble", "prompt": "x", "top_k": -2}, "top_k"),
    ({"model": "ensemble", "prompt": "x", "top_k": 2.5}, "top_k"),
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


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "x", "api_key": "sk-123"}, "api_key"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True, "chunk_size": 4}},
     "stream_options.chunk_size"),
])
def test_unknown_fields_are_refused_by_name(body: dict, param: str) -> None:
    err = error_of(api.CompletionRequest, body)
    assert err.param == param and err.message == f"{param}: unrecognized parameter"


def test_unknown_fields_in_a_message_are_refused_by_name() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}
    assert error_of(api.ChatCompletionRequest, body).param == "messages.0.tool_calls"


def test_log_params_keep_sampling_parameters_only() -> None:
    req = api.CompletionRequest.model_validate({"model": "m", "prompt": "secret prompt", "seed": 3})
    assert req.log_params() == {"model": "m", "seed": 3, "stream": False, "return_routing": False,
                                "ignore_eos": False, "echo": False}


@pytest.mark.parametrize("field, value", [
    ("temperature", "0.5"), ("max_tokens", "16"), ("max_tokens", 16.5), ("max_tokens", True), ("stream", 1),
    ("stream", "true"), ("seed", 1.5), ("logprobs", False), ("echo", "yes"),
])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(field: str, value) -> None:
    err = error_of(api.CompletionRequest, {"model": "m", "prompt": "x", field: value})
    assert err.param == field and err.code == "invalid_parameter"


@pytest.mark.parametrize("schema, body, param, says", [
    (api.CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "0 only with echo"),
    (api.CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "stream": True}, "echo", "stream"),
    (api.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                 "top_logprobs": 3}, "top_logprobs", "requires logprobs"),
    (api.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": ""},
                                                           {"role": "tool"}]},
     "messages", "every message is empty"),
])
def test_rules_between_parameters_name_a_parameter(schema, body: dict, param: str, says: str) -> None:
    err = error_of(schema, body)
    assert err.param == param and err.message.startswith(f"{param}: ") and says in err.message


@pytest.mark.parametrize("prompt", ["", [], [[]], [""]])
def test_an_empty_prompt_is_refused(prompt) -> None:
    err = error_of(api.CompletionRequest, {"model": "m", "prompt": prompt})
    assert err.param == "prompt" and "empty" in err.message


def test_a_union_error_reports_the_member_the_input_meant() -> None:
    """An image part fails inside the list-of-parts member; "should be a valid string" would mislead."""
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    err = error_of(api.ChatCompletionRequest, body)
    assert err.param == "messages.0.content.0" and "only text content parts are supported" in err.message
    err = error_of(api.CompletionRequest, {"model": "m", "prompt": {"text": "x"}})
    assert err.param == "prompt" and err.message.startswith("prompt: Input should be one of: str, list[int]")


@pytest.mark.parametrize("model, mode", [(api.CompletionRequest, "validation"), (api.ChatCompletionRequest,
                                                                                  "validation")])
def test_request_schemas_refuse_unknown_fields_and_state_the_rules(model, mode) -> None:
    schema = model.model_json_schema(mode=mode)
    assert schema["additionalProperties"] is False and schema["allOf"]
    props = schema["properties"]
    assert props["n"]["maximum"] == 1 and props["logit_bias"]["maxProperties"] == 0
    text = {"type": "string", "minLength": 1}
    assert {"type": "array", "items": text, "maxItems": api.MAX_STOP_STRINGS} in props["stop"]["anyOf"]


def test_responses_parse_as_the_openai_packages_types() -> None:
    """Our models extend OpenAI's shapes (routing, usage.expert_tokens); a client typed with `openai` reads
    them."""
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    usage = api.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, expert_tokens={"code": 2})
    routing = api.Routing(gate_version="g1", share={"code": 1.0},
                          tokens=[api.TokenRoute(index=0, token="x", experts={"code": 1.0})])
    head = {"id": "cmpl-1", "created": 1, "model": "ensemble", "system_fingerprint": "g1"}
    lp = api.CompletionLogprobs(tokens=["a"], token_logprobs=[-0.5], top_logprobs=[{"a": -0.5}],
                                text_offset=[0])
    completion = api.CompletionResponse(**head, usage=usage, choices=[
        api.CompletionChoice(text="ab", logprobs=lp, finish_reason="length", routing=routing)]).model_dump()
    parsed = Completion.model_validate(completion)
    assert parsed.usage.total_tokens == 5 and parsed.choices[0].model_extra["routing"]["gate_version"] == "g1"
    top = api.ChatTokenLogprob(token="a", logprob=-0.5, bytes=[97],
                               top_logprobs=[api.TopLogprob(token="a", logprob=-0.5)])
    chat = api.ChatCompletionResponse(**head, usage=usage, choices=[api.ChatChoice(
        message=api.AssistantMessage(content="hi"), finish_reason="stop",
        logprobs=api.ChatLogprobs(content=[top]))]).model_dump()
    assert ChatCompletion.model_validate(chat).choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.5
    for delta, finish in [(api.ChatDelta(role="assistant", content=""), None),
                          (api.ChatDelta(content="hi"), "length")]:
        choice = api.ChatChunkChoice(delta=delta, finish_reason=finish)
        chunk = api.ChatCompletionChunk(**head, choices=[choice])
        assert ChatCompletionChunk.model_validate(chunk.model_dump()).choices[0].delta.content in ("", "hi")
    assert Model.model_validate(api.ModelCard(id="code", created=1).model_dump()).owned_by == "ensemble"


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
