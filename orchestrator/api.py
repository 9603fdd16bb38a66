"""OpenAI-compatible HTTP schemas of the gateway: requests (validated once, here), responses, error body.

Field names mirror OpenAI's. Extras: request `return_routing`/`ignore_eos`/`experts_per_token`, response
`usage.expert_tokens` and, when asked for, `choices[].routing` (which experts produced each token, and their
weights). The models are the published contract (/openapi.json): requests are strict (no coercion, no unknown
fields), so what the schema refuses the gateway refuses; rules kept in validators are mirrored in the schema.

Why our own models and not the ecosystem's: the `openai` package is a client dependency (its request params
are TypedDicts, and its response types say `finish_reason` is never null, false for stream chunks), and vLLM's
protocol models declare ~60 vLLM-only parameters we do not honour and import vllm.config into the ingress.
tests/unit/test_api_schemas.py checks that our responses parse as the `openai` package's types.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import Request

MAX_LOGPROBS = 20            # the engine reports at most 20 alternatives per token
MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5          # temperatures under this decode greedily (vLLM's _SAMPLING_EPS)


# ---- errors --------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """Raised anywhere in the gateway; rendered as {"error": {...}} with `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error or server_error")
    param: str | None = Field(description="the offending request parameter, e.g. `messages.0.content`")
    code: str | None = Field(description="e.g. invalid_parameter, invalid_json, model_not_found, "
                                         "context_length_exceeded, request_too_large")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (and of an error event inside a stream), as in OpenAI's API."""

    error: ErrorDetail


def param_error(param: str, message: str) -> PydanticCustomError:
    """A model-level validation error that still names its parameter (see error_from_validation)."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member an error came from inside `loc`: ("prompt", "list[int]", 3)
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "none"})


def error_from_validation(exc: ValidationError) -> OpenAIError:
    """The most telling pydantic error -> 400 naming the offending parameter (e.g. `messages.0.content`).

    For a union (prompt: string or token ids) pydantic reports one error per member; a member that matched the
    input's type and failed deeper (e.g. an image content part) says more than "should be a string"."""
    errors = exc.errors(include_url=False)
    field = errors[0]["loc"][:1]
    same = [e for e in errors if e["loc"][:1] == field]
    deeper = [e for e in same if not (e["type"].endswith("_type") or e["type"] == "none_required")]
    err = (deeper or same)[0]
    param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or err.get("ctx", {}).get("param")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "this parameter is required"
    elif err["type"] == "extra_forbidden":
        msg = "unrecognized parameter"
    elif not deeper and len(same) > 1:
        members = [str(p) for e in same for p in e["loc"][1:2] if _is_union_tag(p)]
        msg = f"Input should be one of: {', '.join(dict.fromkeys(members))}"
    return OpenAIError(f"{param}: {msg}" if param else msg, param=param, code="invalid_parameter")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _number(text: str) -> int | float:
    # As in JSON Schema, a number without a fractional part is an integer: "max_tokens": 16.0 is 16.
    value = float(text)
    return int(value) if value.is_integer() else value


# A \uD800-\uDFFF escape: a surrogate, which json.loads lets through alone (unpaired): not Unicode, and it
# breaks every UTF-8 consumer downstream (tokenizer, traffic log, response rendering).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refusing bodies over `limit` bytes before reading them all.

    Strict JSON (RFC 8259): UTF-8 only, no NaN/Infinity, no lone surrogates; anything else is a 400."""
    declared = request.headers.get("content-length", "")
    too_big = OpenAIError(f"request body exceeds {limit} bytes", status=413, code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenAIError(f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                          code="invalid_json") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_number)
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")     # raises on an unpaired surrogate
    except UnicodeEncodeError:
        raise OpenAIError("the JSON body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)",
                          code="invalid_json") from None
    except RecursionError:
        raise OpenAIError("the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:      # JSONDecodeError, NaN/Infinity, integers beyond 4300 digits
        raise OpenAIError(f"We could not parse the JSON body of your request ({exc}).",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise OpenAIError("the request body must be a JSON object", code="invalid_json")
    return obj


# ---- requests ------------------------------------------------------------------------------------------

# Strict: "0.5" is not a number and "yes" is not a boolean; unknown parameters are refused (OpenAI does the
# same), so a client never believes an unsupported option (tools, response_format, ...) took effect.
_STRICT = ConfigDict(extra="forbid", strict=True)
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT = {"type": "string", "minLength": 1}


def _rule(when: dict, then: dict, *, required: bool = False) -> dict:
    """A rule between parameters (enforced by a model validator) in JSON Schema: if `when`, then `then`.
    In the schema, so that generated requests obey it too (fuzzers reach the engine instead of a 400)."""
    return {"if": {"properties": when, "required": list(when)},
            "then": {"properties": then, **({"required": list(then)} if required else {})}}


_EXPERTS_PER_TOKEN_RULE = _rule({"experts_per_token": {"type": "integer"}}, {"model": {"const": "ensemble"}})


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT

    model: str = Field(description="`ensemble` (the gated mix) or one expert's name: see GET /v1/models")
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(
        None, ge=-1, le=2**31 - 1,
        description="vLLM's extension: sample among the top_k most likely tokens only (-1, 0 or absent: all). "
                    "Model `ensemble`: a top_k within the candidates (each selected expert's top 20) leaves out "
                    "the mix's tail")
    n: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 1})
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema({"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]})] = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    # Accepted for compatibility at their neutral values only.
    presence_penalty: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 0})
    frequency_penalty: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 0})
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    # Extensions.
    return_routing: bool = Field(False, description="add choices[].routing: the experts behind every token")
    ignore_eos: bool = False
    experts_per_token: int | None = Field(
        None, ge=1, le=64, description="model `ensemble` only: experts mixed per token (default: top_k)")

    @field_validator("temperature")
    @classmethod
    def _greedy_below_epsilon(cls, v: float | None) -> float | None:
        # As vLLM does: a temperature this small is greedy decoding (dividing by it overflows to inf), on
        # every path (the ensemble's sampler and an expert's own engine answer it the same way).
        return 0.0 if v is not None and v < GREEDY_BELOW else v

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported (one sequence per request)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("repetition penalties are not supported; leave this at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def log_params(self) -> dict:
        """What the traffic log keeps: sampling parameters only (the prompt is stored separately)."""
        return self.model_dump(exclude={"prompt", "messages"}, exclude_none=True)


class CompletionRequest(_SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _EXPERTS_PER_TOKEN_RULE, _rule({"echo": {"const": True}}, {"stream": {"const": False}}),
        _rule({"max_tokens": {"const": 0}}, {"echo": {"const": True}}, required=True)]})

    prompt: Annotated[str | list[int] | list[str] | list[list[int]], WithJsonSchema({
        "description": "text, or token ids; a list of texts or of token-id lists must hold exactly one",
        "anyOf": [_TEXT, _TOKEN_IDS, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1},
                  {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1}]})]
    max_tokens: int | None = Field(None, ge=0, description="default 16; 0 only with echo=true (scoring)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 1})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported (send a string or one token list)")
            v = v[0]
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    @model_validator(mode="after")
    def _echo_rules(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise param_error("echo", "not supported together with stream")
        if self.max_tokens == 0 and not self.echo:
            raise param_error("max_tokens", "must be at least 1 (0 only with echo=true, to score the prompt)")
        return self


class ContentPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"only text content parts are supported, got type {data.get('type')!r}")
        return data


_HAS_TEXT = {"required": ["content"], "properties": {"content": {"anyOf": [
    _TEXT, {"type": "array", "contains": {"properties": {"text": _TEXT}}}]}}}


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _EXPERTS_PER_TOKEN_RULE,
        _rule({"top_logprobs": {"type": "integer", "minimum": 1}}, {"logprobs": {"const": True}},
              required=True)]})

    messages: list[ChatMessage] = Field(min_length=1, description="at least one message with some text",
                                        json_schema_extra={"contains": _HAS_TEXT})
    max_tokens: int | None = Field(None, ge=1, description="default: as many as fit in the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if not any(m.text() for m in self.messages):
            raise param_error("messages", "every message is empty; there is nothing to answer")
        if self.top_logprobs and not self.logprobs:
            raise param_error("top_logprobs", "requires logprobs=true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def log_params(self) -> dict:
        return {**super().log_params(), "messages": [m.model_dump(exclude_none=True) for m in self.messages]}


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: rate a logged response (1 good, 0 neutral, -1 bad), optionally with a correction."""

    model_config = _STRICT

    request_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=-1, le=1)
    corrected_text: str | None = None


# ---- responses -----------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def _absent_if_none(v: object) -> bool:
    return v is None


class _Response(BaseModel):
    # In /openapi.json a field with a default is still always sent (required), unless left out when None.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class TokenRoute(_Response):
    """One generated token and the experts that produced it, heaviest first: {"code": 0.81, "math": 0.19}."""

    index: int
    token: str
    experts: dict[str, float]


class Routing(_Response):
    gate_version: str
    share: dict[str, float]          # mean weight per expert over the tokens of this response/chunk
    tokens: list[TokenRoute]
    # Tokens (indices) for which an expert the gate chose could not answer: their weights were renormalised
    # over the experts that could. Empty when nothing was degraded.
    degraded: list[int] = Field(default_factory=list)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Generated tokens each expert took part in (top-k experts per token, so they sum to k x completion_tokens).
    expert_tokens: dict[str, int] = Field(default_factory=dict)
    # Generated tokens routed around an expert that could not answer (dead, hung, at capacity): the gate's
    # weights were renormalised over the experts that could. 0 on a healthy service.
    degraded_tokens: int = 0


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class CompletionResponse(_Response):
    """POST /v1/completions; with stream=true each event is one of these too (finish_reason null until the
    last; a final usage-only event with no choices when stream_options.include_usage)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="the gate version that answered")
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="the gate version that answered")
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionChunk(_Response):
    """One event of POST /v1/chat/completions with stream=true: the first carries the role, the last the
    finish_reason; a final usage-only event with no choices when stream_options.include_usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ensemble"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackResponse(_Response):
    id: str
    object: Literal["feedback"] = "feedback"
    request_id: str
    rating: int


class ExpertState(_Response):
    state: Literal["ok", "degraded", "down"]
    failures: int
    last_error: str | None = Field(None, exclude_if=_absent_if_none)


class HealthResponse(_Response):
    """GET /health: 200 while the gateway can serve (status ok or degraded), 503 (unavailable) when not."""

    status: Literal["ok", "degraded", "unavailable"]
    gate_version: str
    models: list[str]
    in_flight: int
    experts: dict[str, ExpertState]
    traffic_log: str | None = Field(None, exclude_if=_absent_if_none)
    gate_error: str | None = Field(None, exclude_if=_absent_if_none)
