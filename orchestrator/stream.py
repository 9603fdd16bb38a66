"""Text layer over the token-id engine: prompt text -> ids, ids -> incremental text, stop strings, chat template.

`stream_text` turns the engine's TokenEvents into TextDeltas; it never emits text that could still become
the start of a stop string, and cuts the output right before the first stop string it finds.

Chat template. A tokenizer that ships a `chat_template` (e.g. Mixtral-Instruct) is rendered with it. The
demo experts are not chat-tuned and have none, so we use this plain transcript, which a base model
continues naturally; generation also stops where the model would start the user's next turn:

    System: {system}            <- only if there is a system/developer message
    <blank line>
    User: {user}
    <blank line>
    Assistant: {assistant}      <- earlier turns, if any
    <blank line>
    User: {user}
    <blank line>
    Assistant:                  <- the model continues from here; implicit stops "\\nUser:", "\\nSystem:"
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from orchestrator.profile import PhaseClock
from orchestrator.types import TokenEvent

SIMPLE_TEMPLATE_ROLES = {"system": "System", "developer": "System", "user": "User",
                         "assistant": "Assistant", "tool": "Tool"}
SIMPLE_TEMPLATE_STOPS = ("\nUser:", "\nSystem:")
# Prompt tokens kept as left context when detokenizing, so the first generated token keeps its leading space
# (SentencePiece-style decoders drop it at the start of a decode call). Same value vLLM uses.
DETOKENIZE_CONTEXT = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    add_special_tokens: bool        # False when the template already wrote BOS and friends itself
    implicit_stops: tuple[str, ...]


class TextCodec:
    """The shared tokenizer of the experts, seen as text <-> ids (wraps a transformers tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    @classmethod
    def from_pretrained(cls, path: str) -> TextCodec:
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer is really loaded

        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as a human reads it in logprobs/routing (special tokens shown, e.g. "</s>")."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def render_chat(self, messages: Sequence[dict]) -> ChatPrompt:
        """messages: [{"role", "content": str}] -> the prompt text the model continues."""
        if getattr(self.tokenizer, "chat_template", None):
            # Few templates know the newer "developer" role; it means what "system" always meant.
            msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return ChatPrompt(text, add_special_tokens=False, implicit_stops=())
        turns = [f"{SIMPLE_TEMPLATE_ROLES[m['role']]}: {m['content']}" for m in messages]
        return ChatPrompt("\n\n".join([*turns, "Assistant:"]), add_special_tokens=True,
                          implicit_stops=SIMPLE_TEMPLATE_STOPS)

    def detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids[-DETOKENIZE_CONTEXT:])

    @property
    def backend(self):
        """The Rust tokenizer under a fast transformers tokenizer, None for a slow (Python) one."""
        return getattr(self.tokenizer, "_tokenizer", None)

    def decode_stream(self, context: Sequence[int]):
        """tokenizers' incremental decoder primed with `context` (special tokens skipped, as `decode`), or None
        when there is no fast tokenizer or the installed tokenizers cannot prime one."""
        if self.backend is None:
            return None
        try:
            from tokenizers.decoders import DecodeStream

            return DecodeStream(ids=list(context), skip_special_tokens=True)
        except (ImportError, TypeError):        # tokenizers before 0.22 has no DecodeStream(ids=...)
            return None

    def offsets(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """Decode `ids` from scratch -> (text, character offset where each token's text starts)."""
        detok, offsets, text = IncrementalDetokenizer(self, ()), [], ""
        for t in ids:
            offsets.append(len(text))
            text += detok.push(t)
        return text + detok.flush(), offsets


class IncrementalDetokenizer:
    """Token ids in, text deltas out. A delta is held back while it ends inside a multi-byte character.

    Two ways to the same text. With a fast (Rust) tokenizer, tokenizers' own incremental decoder, DecodeStream,
    primed with the context ids (what vLLM's FastIncrementalDetokenizer does): 0.7 µs a token on this machine.
    Otherwise, or if that decoder fails on a token (tokenizers' "Invalid prefix" on non-monotonic UTF-8, vLLM
    issue 17448), vLLM's window algorithm in Python from there on: decode a small window (previous token(s) +
    new ones) and emit what the new tokens added, two decodes a token (5.2 µs). Both keep word-boundary spaces
    right; tests/unit/test_stream_text.py checks that they give the same deltas. `flush` releases what is still
    held back at the end, an incomplete character included, through the window algorithm.
    """

    def __init__(self, codec: TextCodec, context: Sequence[int]) -> None:
        self.codec = codec
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._stream = codec.decode_stream(self.ids)
        self._backend = codec.backend

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is None:
            return self._advance(final=False)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # noqa: BLE001 (tokenizers raises a bare Exception: "Invalid prefix encountered")
            self._stream = None                  # the window algorithm from here on (same offsets)
            return self._advance(final=False)
        if not piece:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return piece

    def flush(self) -> str:
        """At the end of the sequence: release whatever is pending, even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self.ids[self.prefix_offset:]
        prefix_text = self.codec.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.codec.decode(window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Feeds text through, holding back any tail that could be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was found; if so the text ends right before it)."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class TextDelta:
    """New output text plus the token events consumed since the previous delta (their text may be
    empty: held back for a stop string, an incomplete character, or cut by a stop string)."""

    text: str
    events: tuple[TokenEvent, ...]
    finish_reason: str | None = None


async def stream_text(events: AsyncIterator[TokenEvent], detok: IncrementalDetokenizer,
                      stops: StopMatcher, clock: PhaseClock | None = None) -> AsyncIterator[TextDelta]:
    """Engine events -> text deltas; the last delta carries finish_reason. The caller closes `events`
    (a stop string ends the text before the engine would have stopped). `clock` counts the detokenize time."""
    pending: list[TokenEvent] = []
    async for ev in events:
        t0 = time.perf_counter()
        pending.append(ev)
        piece = detok.push(ev.token_id)
        if ev.finish_reason is not None:
            piece += detok.flush()
        text, stopped = stops.push(piece)
        if clock is not None:
            clock.add("detokenize", time.perf_counter() - t0)
        if stopped:
            yield TextDelta(text, tuple(pending), "stop")
            return
        if ev.finish_reason is not None:
            yield TextDelta(text + stops.flush(), tuple(pending), ev.finish_reason)
            return
        if text:
            yield TextDelta(text, tuple(pending))
            pending = []
    # The engine ended without a finish reason: max_tokens=0, or the context was already full.
    text, stopped = stops.push(detok.flush())
    yield TextDelta(text if stopped else text + stops.flush(), tuple(pending), "stop" if stopped else "length")
