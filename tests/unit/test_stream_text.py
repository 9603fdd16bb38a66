"""Text layer: incremental detokenization, stop strings without leakage, chat templates, text streams."""

from __future__ import annotations

import random

import pytest

from orchestrator.stream import SIMPLE_TEMPLATE_STOPS, StopMatcher, TextCodec, stream_text
from orchestrator.types import GateDecision, TokenEvent
from tests.gateway_fakes import CORPUS, byte_level_tokenizer, metaspace_tokenizer

TOKENIZERS = {"byte_level": byte_level_tokenizer, "metaspace": metaspace_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def codec(request) -> TextCodec:
    return TextCodec(TOKENIZERS[request.param]())


def events_for(ids: list[int], finish: str | None = "length") -> list[TokenEvent]:
    route = GateDecision(("code", "prose"), (0.75, 0.25), 0.5)
    return [TokenEvent("r", i, t, -1.0, route, (), finish if i == len(ids) - 1 else None) for i, t in enumerate(ids)]


async def aiter(items):
    for x in items:
        yield x


async def run_stream(codec: TextCodec, prompt: list[int], ids: list[int], stops=(), finish="length"):
    return [d async for d in stream_text(aiter(events_for(ids, finish)), codec.detokenizer(prompt), StopMatcher(stops))]


@pytest.mark.parametrize("text", [*CORPUS[:6], "  leading spaces and\ttabs\n\nnewlines  "])
def test_detokenized_deltas_equal_the_full_decode(codec: TextCodec, text: str) -> None:
    ids = codec.encode("Prompt: " + text)
    for cut in (2, len(ids) // 2, len(ids) - 1):
        prompt, output = ids[:cut], ids[cut:]
        detok = codec.detokenizer(prompt)
        deltas = [detok.push(t) for t in output] + [detok.flush()]
        assert "".join(deltas) == codec.decode(ids)[len(codec.decode(prompt)):]
        assert not any("\ufffd" in d for d in deltas), "a partial multi-byte character leaked"


def test_detokenizer_keeps_the_first_tokens_leading_space() -> None:
    codec = TextCodec(metaspace_tokenizer())
    prompt, output = codec.encode("The quick"), codec.encode("The quick brown fox")[len(codec.encode("The quick")):]
    detok = codec.detokenizer(prompt)
    assert "".join(detok.push(t) for t in output) + detok.flush() == " brown fox"


def test_random_tokens_stream_every_byte_eventually(codec: TextCodec) -> None:
    rng = random.Random(0)
    ids = [rng.randrange(2, len(codec.tokenizer)) for _ in range(200)]
    detok = codec.detokenizer([0])
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == codec.decode([0, *ids])


@pytest.mark.parametrize("chunks, expected", [
    (["Hello\nUs", "er: more"], ["Hello", ""]),            # stop split across chunks: nothing leaks
    (["Hello\nUs", "ually fine"], ["Hello", "\nUsually fine"]),   # false alarm: released later
    (["abc\nUser:xyz"], ["abc"]),                          # stop inside one chunk
    (["a\nSys", "tem: b\nUser:"], ["a", ""]),               # second stop string
])
def test_stop_matcher_never_leaks_a_partial_stop(chunks, expected) -> None:
    m = StopMatcher(SIMPLE_TEMPLATE_STOPS)
    outs, stopped = [], False
    for c in chunks:
        out, stopped = m.push(c)
        outs.append(out)
        if stopped:
            break
    assert outs == expected


def test_stop_matcher_earliest_stop_wins_and_flush_releases_held_text() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == ("hel", True)
    m = StopMatcher(["STOP"])
    assert m.push("end ST") == ("end ", False)
    assert m.flush() == "ST"


async def test_stream_cuts_output_before_a_stop_string(codec: TextCodec) -> None:
    prompt = codec.encode("x")
    ids = codec.encode("The answer is 42. User: next question")[1:]
    deltas = await run_stream(codec, prompt, ids, stops=["User:"])
    text = "".join(d.text for d in deltas)
    assert text == codec.decode(prompt + ids)[len(codec.decode(prompt)):].split("User:")[0]
    assert deltas[-1].finish_reason == "stop"
    assert "User" not in text and all(not d.finish_reason for d in deltas[:-1])


async def test_stream_accounts_for_every_token_and_ends_with_finish_reason(codec: TextCodec) -> None:
    ids = codec.encode("def add(a, b): return a + b")[1:]
    deltas = await run_stream(codec, [0], ids, stops=["zzz"], finish="length")
    assert [e.token_id for d in deltas for e in d.events] == ids
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == codec.decode(ids)


async def test_empty_engine_stream_is_a_length_finish(codec: TextCodec) -> None:
    deltas = await run_stream(codec, [0], [], finish="length")
    assert [(d.text, d.events, d.finish_reason) for d in deltas] == [("", (), "length")]


def test_simple_chat_template_is_a_plain_transcript(codec: TextCodec) -> None:
    chat = codec.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}])
    assert chat.text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: 2+2?\n\nAssistant:"
    assert chat.add_special_tokens and chat.implicit_stops == SIMPLE_TEMPLATE_STOPS


def test_tokenizer_chat_template_is_used_when_present() -> None:
    tok = byte_level_tokenizer()
    codec = TextCodec(tok)
    copy = TextCodec(tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>"))
    copy.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    chat = copy.render_chat([{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}])
    assert chat.text == "<s>[system]rules[user]hi[assistant]"
    assert not chat.add_special_tokens and chat.implicit_stops == ()
    assert copy.encode(chat.text, chat.add_special_tokens).count(0) == 1     # exactly one BOS
    assert not getattr(codec.tokenizer, "chat_template", None)


def test_offsets_point_at_each_tokens_text(codec: TextCodec) -> None:
    ids = codec.encode("The quick brown fox")
    text, offsets = codec.offsets(ids)
    assert text == codec.decode(ids)
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)


@pytest.mark.parametrize("seed", range(3))
def test_the_fast_decoder_and_the_window_algorithm_give_the_same_deltas(codec: TextCodec, seed: int) -> None:
    """tokenizers' DecodeStream (fast tokenizers) and vLLM's window algorithm (the fallback), token by token, over
    real text and random ids (partial characters, special tokens)."""
    assert codec.decode_stream([0]) is not None, "these tokenizers are fast: the DecodeStream path is what runs"
    rng = random.Random(seed)
    for text in CORPUS[:8]:
        ids = codec.encode("Prompt: " + text)
        cut = rng.randrange(1, len(ids) - 1)
        for output in (ids[cut:], [rng.randrange(len(codec.tokenizer)) for _ in range(80)]):
            fast, window = codec.detokenizer(ids[:cut]), codec.detokenizer(ids[:cut])
            window._stream = None
            assert [fast.push(t) for t in output] + [fast.flush()] == [window.push(t) for t in output] + [window.flush()]


def test_a_decoder_error_falls_back_to_the_window_algorithm_and_loses_no_text(codec: TextCodec) -> None:
    class Failing:
        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered")  # noqa: TRY002 (what tokenizers raises)

    ids = codec.encode("Prompt: " + CORPUS[0])
    detok = codec.detokenizer(ids[:3])
    first = detok.push(ids[3])
    detok._stream = Failing()
    text = first + "".join(detok.push(t) for t in ids[4:]) + detok.flush()
    assert text == codec.decode(ids)[len(codec.decode(ids[:3])):]
