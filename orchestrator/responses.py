"""Engine output as OpenAI response fields (routing, usage, logprobs), SSE framing, and a streaming response
that always closes its body, so an abandoned stream is still logged and its engine sessions freed.

`token_text(id)` renders one token for humans (the text codec's); a parameter, so the builders stay pure.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence

import msgspec
from starlette.responses import StreamingResponse

from orchestrator.api import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    Routing,
    TokenRoute,
    TopLogprob,
    Usage,
)
from orchestrator.types import TokenEvent


def routing_of(events: Sequence[TokenEvent], token_text: Callable[[int], str], gate_version: str) -> Routing:
    tokens: list[TokenRoute] = []
    totals: dict[str, float] = {}
    for ev in events:
        pairs = sorted(zip(ev.routing.experts, ev.routing.weights), key=lambda p: -p[1])
        tokens.append(TokenRoute(index=ev.index, token=token_text(ev.token_id),
                                 experts={name: round(w, 4) for name, w in pairs}))
        for name, w in pairs:
            totals[name] = totals.get(name, 0.0) + w
    n = max(len(events), 1)
    share = {name: round(w / n, 4) for name, w in sorted(totals.items(), key=lambda p: -p[1])}
    return Routing(gate_version=gate_version, share=share, tokens=tokens,
                   degraded=[ev.index for ev in events if ev.routing.degraded])


def expert_token_counts(events: Sequence[TokenEvent]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in events:
        for name in ev.routing.experts:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda p: -p[1]))


def usage_of(prompt_tokens: int, events: Sequence[TokenEvent]) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=len(events),
                 total_tokens=prompt_tokens + len(events), expert_tokens=expert_token_counts(events),
                 degraded_tokens=sum(1 for ev in events if ev.routing.degraded))


def concat_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """Prompt logprobs followed by completion logprobs (echo=true with generation)."""
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def completion_logprobs(events: Sequence[TokenEvent], token_text: Callable[[int], str],
                        text_offset: int = 0) -> CompletionLogprobs:
    """Legacy /v1/completions logprobs; `text_offset` is where the first token's text starts."""
    out = CompletionLogprobs()
    for ev in events:
        text = token_text(ev.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(ev.logprob)
        out.top_logprobs.append({token_text(t): lp for t, lp in ev.top_logprobs} or None)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(events: Sequence[TokenEvent], token_text: Callable[[int], str]) -> ChatLogprobs:
    def top(t: int, lp: float) -> TopLogprob:
        s = token_text(t)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**top(ev.token_id, ev.logprob).model_dump(),
                         top_logprobs=[top(t, lp) for t, lp in ev.top_logprobs])
        for ev in events
    ])


class ClosingStreamingResponse(StreamingResponse):
    """Starlette abandons the body iterator when the client goes away; close it (and run `on_close`) so the
    request is logged and its engine sessions are freed right away, not whenever the GC gets to it."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kw) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.on_close()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


_json = msgspec.json.Encoder()


# Characters that str.splitlines() and httpx's iter_lines() take for line breaks: raw inside an event, they would
# cut its data line in two for such readers (json.dumps escapes them; msgspec writes them as UTF-8).
_LINE_BREAKS = ("\u2028", "\u2029", "\x85")        # JSON escapes the control characters among them


def sse_fast(obj: dict) -> str:
    """sse() for the plain per-token events (responses.plain_chunk: strings, ints and None only): msgspec writes
    the same JSON (non-ASCII as UTF-8, not \\u escapes) in a fifth of json.dumps' time. Text that UTF-8 cannot
    carry (a lone surrogate), or with a character some readers split lines at, takes json.dumps' escapes."""
    try:
        text = _json.encode(obj).decode()
    except UnicodeEncodeError:
        return sse(obj)
    if any(c in text for c in _LINE_BREAKS):
        return sse(obj)
    return f"data: {text}\n\n"


def plain_chunk(endpoint: str, request_id: str, created: int, model: str, gate_version: str, text: str,
                finish_reason: str | None) -> dict:
    """One streamed event without logprobs or routing, the event almost every stream sends per token: the same
    dict as api.CompletionResponse / api.ChatCompletionChunk(...).model_dump() (tests/unit/test_sse_chunks.py),
    built directly. Four pydantic models and a dump per token cost ≈ 20 µs of the gateway's event loop."""
    head = {"id": request_id, "object": "text_completion" if endpoint == "completions" else "chat.completion.chunk",
            "created": created, "model": model, "system_fingerprint": gate_version}
    if endpoint == "completions":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
    head["choices"] = [choice]
    return head
