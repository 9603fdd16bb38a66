"""Teacher-forced scoring in one engine: the logprobs of a given token sequence, position by position.

vLLM's `prompt_logprobs` gives them for a prompt; sequences longer than the context are scored in
overlapping windows (plan_score_windows) whose kept rows tile the predictions exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from experts.vllm_engine import PositionLogprobs, score_params


def plan_score_windows(length: int, window: int) -> list[tuple[int, int]]:
    """(start, keep_from) per window so that the kept rows tile the predictions 0..length-2 exactly once.

    A window covers tokens [start, start + window); its row i predicts token start + i + 1. Sequences that
    fit are one window. Longer ones use stride window//2: the first window keeps all rows, each later one
    only its last `stride` rows, so every prediction sees at least window - stride tokens of context (a
    sliding context, not the full prefix, which the model could not attend to anyway).
    """
    if length <= window:
        return [(0, 0)]
    if window < 2:
        raise ValueError(f"cannot score {length} tokens in windows of {window}: need max_model_len >= 3")
    stride = max(1, window // 2)
    starts = [0] + list(range(stride, length - window + stride, stride))
    return [(s, 0 if s == 0 else window - 1 - stride) for s in starts]


async def score_windows(engine: Any, seq: list[int], top_k: int, window: int,
                        ids: itertools.count) -> list[PositionLogprobs]:
    """Row j = logprobs predicting seq[j+1] from seq[..j], for j in 0..T-2.

    vLLM's prompt_logprobs[i] (i >= 1) describes prompt token i given tokens < i; entry 0 is None.
    """
    plan = plan_score_windows(len(seq), window)
    results = await asyncio.gather(*(
        _prompt_logprobs(engine, seq[s:s + window], top_k, f"score#{next(ids)}") for s, _ in plan
    ))
    rows: list[PositionLogprobs] = []
    for (_, keep_from), prompt_lps in zip(plan, results):
        rows.extend(prompt_lps[1 + keep_from:])
    if len(rows) != len(seq) - 1:
        raise RuntimeError(f"score windows produced {len(rows)} rows for {len(seq)} tokens")
    return rows


async def _prompt_logprobs(engine: Any, tokens: list[int], top_k: int, request_id: str) -> list[Any]:
    from vllm.inputs import TokensPrompt

    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=tokens), score_params(top_k), request_id):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    return list(final.prompt_logprobs)
