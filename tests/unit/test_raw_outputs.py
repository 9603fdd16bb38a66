"""Reading vLLM's raw engine outputs (logprob arrays, as the in-process engine hands them over) into our
messages: a session step's top-k and a native generation's delta. Pure functions, vLLM's own output types."""

from __future__ import annotations

import numpy as np
from vllm.v1.engine import EngineCoreOutput, FinishReason
from vllm.v1.outputs import LogprobsLists

from experts.generations import _delta_of_arrays
from experts.protocol import GenerateRequest
from experts.vllm_engine import topk_of_arrays


def lists(ids, lps) -> LogprobsLists:
    ids, lps = np.array(ids, dtype=np.int64), np.array(lps, dtype=np.float32)
    return LogprobsLists(ids, lps, np.zeros(len(ids), dtype=np.int64))


def test_a_session_steps_top_k_skips_the_sampled_column_and_keeps_the_order():
    row = lists([[7, 7, 3, 9, 1]], [[-0.5, -0.5, -1.0, -2.0, -3.0]])
    top = topk_of_arrays(row.logprob_token_ids[-1], row.logprobs[-1], 3)
    assert top.token_ids == (7, 3, 9)
    assert top.logprobs == (-0.5, -1.0, -2.0)
    assert all(isinstance(t, int) for t in top.token_ids)          # plain ints: they cross Ray and JSON


def test_a_delta_carries_each_tokens_own_logprob_and_its_alternatives():
    req = GenerateRequest("r", (1, 2), max_tokens=8, top_logprobs=2)
    out = EngineCoreOutput("gen-r#0", [5, 6], new_logprobs=lists(
        [[5, 6, 5, 4], [6, 6, 2, 8]], [[-1.5, -1.0, -1.5, -2.5], [-0.25, -0.25, -1.0, -4.0]]))
    delta = _delta_of_arrays(req, out)
    assert delta.token_ids == (5, 6) and delta.finish_reason is None
    assert delta.logprobs == (-1.5, -0.25)
    assert delta.top_logprobs == (((6, -1.0), (5, -1.5)), ((6, -0.25), (2, -1.0)))


def test_a_finished_delta_says_why_and_a_final_empty_output_still_ends_the_stream():
    req = GenerateRequest("r", (1,), max_tokens=2)
    length = _delta_of_arrays(req, EngineCoreOutput("x", [4], new_logprobs=lists([[4]], [[-0.1]]),
                                                    finish_reason=FinishReason.LENGTH))
    assert length.finish_reason == "length" and length.token_ids == (4,) and length.top_logprobs == ()
    stop = _delta_of_arrays(req, EngineCoreOutput("x", [], finish_reason=FinishReason.STOP))
    assert stop.finish_reason == "stop" and stop.token_ids == () and stop.logprobs == ()
