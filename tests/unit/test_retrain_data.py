"""Turning the traffic log into retraining sequences: sources, dedup, split by request, bad logs."""

from types import SimpleNamespace as NS

import pytest

from gating.retrain import (
    RetrainError,
    RetrainOptions,
    build_sequences,
    check_log,
    split_by_request,
    three_way_split,
)


def rec(rid, prompt, output=(9, 9), experts=(("code", "prose"),), error=None):
    return NS(request_id=rid, prompt_ids=tuple(prompt), output_ids=tuple(output), routing_experts=experts, error=error)


def fb(rid, rating, text=None):
    return NS(request_id=rid, rating=rating, corrected_text=text)


def encode(text):
    return [ord(c) % 50 for c in text]


def test_prompts_and_good_feedback_by_default_unrated_completions_left_out():
    records = [rec("a", [1, 2, 3]), rec("b", [1, 4]), rec("c", [1, 5], error="boom")]
    seqs = build_sequences(records, [fb("a", 1), fb("b", -1)], RetrainOptions(), encode)
    assert [(s.request_id, s.source) for s in seqs] == [("a", "prompt"), ("b", "prompt"), ("a", "feedback")]
    assert seqs[2].tokens == (1, 2, 3, 9, 9)
    more = build_sequences(records, [], RetrainOptions(include_unrated_completions=True), encode)
    assert ("b", "completion") in [(s.request_id, s.source) for s in more]


def test_corrected_text_replaces_the_completion_and_duplicates_are_dropped():
    records = [rec("a", [1, 2]), rec("b", [1, 2])]
    seqs = build_sequences(records, [fb("a", 1, "hi")], RetrainOptions(), encode)
    assert len([s for s in seqs if s.source == "prompt"]) == 1
    assert seqs[-1].tokens == (1, 2, *encode("hi"))


def test_split_keeps_each_request_on_one_side():
    records = [rec(f"r{i}", [1, i + 2]) for i in range(30)]
    seqs = build_sequences(records, [fb(f"r{i}", 1) for i in range(30)], RetrainOptions(), encode)
    train, held = split_by_request(seqs, 0.2, 0)
    assert {seqs[i].request_id for i in train}.isdisjoint({seqs[i].request_id for i in held})
    assert held and train


def test_fit_validation_and_heldout_are_disjoint_requests():
    records = [rec(f"r{i}", [1, i + 2]) for i in range(40)]
    seqs = build_sequences(records, [fb(f"r{i}", 1) for i in range(40)], RetrainOptions(), encode)
    fit, val, held = three_way_split(seqs, RetrainOptions())
    sides = [{seqs[i].request_id for i in part} for part in (fit, val, held)]
    assert all(sides) and sum(map(len, sides)) == 40 and len(set().union(*sides)) == 40
    assert sorted(fit + val + held) == list(range(len(seqs)))


def test_too_few_requests_validate_on_the_fit_slice():
    seqs = build_sequences([rec(f"r{i}", [1, i + 2]) for i in range(5)], [], RetrainOptions(), encode)
    fit, val, held = three_way_split(seqs, RetrainOptions())
    assert fit == val and held and not set(fit) & set(held)


def test_bad_logs_are_reported_clearly():
    with pytest.raises(RetrainError, match="no requests"):
        check_log([], ["code"], None, "fp")
    with pytest.raises(RetrainError, match="not configured any more: legacy"):
        check_log([rec("a", [1], experts=(("legacy", "code"),))], ["code", "prose"], None, "fp")
    with pytest.raises(RetrainError, match="tokenizer"):
        check_log([rec("a", [1])], ["code", "prose"], "other-fingerprint", "fp")
