"""The per-token streamed event built without pydantic (responses.plain_chunk) is the very dict the API's
models dump, for both endpoints, every finish reason and any text."""

import json

import pytest

from orchestrator import api
from orchestrator.responses import plain_chunk, sse

HEAD = {"id": "cmpl-1", "created": 1767225600, "model": "ensemble", "system_fingerprint": "gate-v3"}


@pytest.mark.parametrize("finish", [None, "stop", "length"])
@pytest.mark.parametrize("text", ["", " hello", "é\n\"quoted\" \\ tab\t", "😀"])
def test_a_plain_completion_chunk_is_the_models_dump(text, finish):
    want = api.CompletionResponse(**HEAD, choices=[api.CompletionChoice(text=text, finish_reason=finish)]).model_dump()
    got = plain_chunk("completions", HEAD["id"], HEAD["created"], HEAD["model"], HEAD["system_fingerprint"], text, finish)
    assert got == want and list(got) == list(want) and list(got["choices"][0]) == list(want["choices"][0])
    assert json.loads(sse(got)[len("data: "):]) == want


@pytest.mark.parametrize("finish", [None, "stop", "length"])
@pytest.mark.parametrize("text", ["", " hello", "é\n\"quoted\""])
def test_a_plain_chat_chunk_is_the_models_dump(text, finish):
    want = api.ChatCompletionChunk(**HEAD, choices=[api.ChatChunkChoice(delta=api.ChatDelta(content=text),
                                                                        finish_reason=finish)]).model_dump()
    got = plain_chunk("chat.completions", HEAD["id"], HEAD["created"], HEAD["model"], HEAD["system_fingerprint"],
                      text, finish)
    assert got == want and list(got) == list(want) and list(got["choices"][0]) == list(want["choices"][0])


@pytest.mark.parametrize("text", [" plain", "é😀\n\"q\"\\", "a\ud800b", "a\u2028b", "a\u2029b", "a\x85b"])
def test_the_fast_sse_framing_carries_the_same_json(text):
    """sse_fast writes UTF-8 where sse writes \\u escapes; a lone surrogate (no UTF-8 for it) falls back, and so
    do the characters that line-splitting readers (httpx's iter_lines, str.splitlines) take for line breaks:
    each event stays one data line for them."""
    from orchestrator.responses import sse_fast

    obj = plain_chunk("completions", "cmpl-1", 1, "ensemble", "g", text, None)
    fast, slow = sse_fast(obj), sse(obj)
    assert fast.startswith("data: ") and fast.endswith("\n\n")
    assert json.loads(fast[len("data: "):]) == json.loads(slow[len("data: "):]) == obj
    assert [line for line in fast.splitlines() if line] == [fast.strip("\n")]
    import httpx

    decoder = httpx._decoders.LineDecoder()
    assert [line for line in decoder.decode(fast) + decoder.flush() if line] == [fast.strip("\n")]
