"""OpenAI-compatible HTTP schemas of the gateway: requests (validated once, here), responses, error body.

Field names mirror OpenAI's. Extras: request `return_routing`/`ignore_eos`, response `usage.expert_tokens`
and, when asked for, `choices[].routing` (which experts produced each token, with their weights).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.requests import Request

MAX_LOGPROBS = 20            # the engine reports at most 20 alternatives per token
MAX_STOP_STRINGS = 16


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
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_from_validation(exc: ValidationError) -> OpenAIError:
    """First pydantic error -> 400 naming the offending parameter (e.g. `messages.0.content`)."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "this parameter is required"
    elif err["type"] == "extra_forbidden":
        msg = "unrecognized parameter"
    return OpenAIError(f"{param}: {msg}" if param else msg, param=param, code="invalid_parameter")


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refusing bodies over `limit` bytes before reading them all."""
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
        obj = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(f"We could not parse the JSON body of your request ({exc}).",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise OpenAIError("the request body must be a JSON object", code="invalid_json")
    return obj


# ---- requests ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions.
    return_routing: bool = False
    ignore_eos: bool = False
    # model="ensemble" only: experts mixed per token (the gate's top-k); default: the service's top_k.
    experts_per_token: int | None = Field(None, ge=1, le=64)

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
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported (send a string or one token list)")
            return v[0]
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
    def _echo_not_streamed(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise ValueError("echo is not supported together with stream")
        return self


class ContentPart(BaseModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, got type {self.type!r}")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def log_params(self) -> dict:
        return {**super().log_params(), "messages": [m.model_dump(exclude_none=True) for m in self.messages]}


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: rate a logged response (1 good, 0 neutral, -1 bad), optionally with a correction."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=-1, le=1)
    corrected_text: str | None = None


# ---- responses -----------------------------------------------------------------------------------------

def _absent_if_none(v: object) -> bool:
    return v is None


class TokenRoute(BaseModel):
    """One generated token and the experts that produced it, heaviest first: {"code": 0.81, "math": 0.19}."""

    index: int
    token: str
    experts: dict[str, float]


class Routing(BaseModel):
    gate_version: str
    share: dict[str, float]          # mean weight per expert over the tokens of this response/chunk
    tokens: list[TokenRoute]
    # Tokens (indices) for which an expert the gate chose could not answer: their weights were renormalised
    # over the experts that could. Empty when nothing was degraded.
    degraded: list[int] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Generated tokens each expert took part in (top-k experts per token, so they sum to k x completion_tokens).
    expert_tokens: dict[str, int] = Field(default_factory=dict)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    routing: Routing | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "ensemble"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class FeedbackResponse(BaseModel):
    id: str
    object: str = "feedback"
    request_id: str
    rating: int
