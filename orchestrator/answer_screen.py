"""The gateway's quick test that every answer of an expert call is sound, before anything reads them.

experts/answer_checks.py says what is wrong with an answer, as numpy reductions over a block of answers: about
ten array ops, whose dispatch is most of their cost at a call's size. The decode loop checks each call's answers
as that call returns (orchestrator/decode_loop.py), four or more calls a round, so that cost would be paid per
call. This kernel (gating/jit.py) makes the same tests in one loop that stops at the first failure: for a call of
16 answers of 20 pairs, 7.7 µs with reading the answers (3.2 µs the loop itself) against 19.7 µs for
answer_checks.topk_problems, on an idle core. It only screens: when it finds anything, the caller asks
answer_checks what is wrong.

The tests, per answer: every id in [0, vocab_size) (vocab_size < 0: any id >= 0), every logprob finite and at
most LOGPROB_SLACK (NaN fails), no id listed twice, and exp(logprobs) summing to at most MASS_LIMIT. The mass is
summed in order, numpy sums pairwise, so the two can disagree only on a mass within a rounding error of
MASS_LIMIT (1.001): such an answer is let through here and may be flagged there, never the other way round for
any answer whose mass is off by more.

A kernel, so numba is imported only by the process that runs decode rounds: expert replicas use answer_checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experts.answer_checks import LOGPROB_SLACK, MASS_LIMIT
from experts.protocol import TopK, stacked
from gating.jit import kernel, on_warm_up


def all_sound(tops: Sequence[TopK], vocab_size: int | None) -> bool:
    """True when every answer passes experts/answer_checks.topk_problems (the usual call); False when any may
    not, or when the answers do not all have the same K > 0 (the caller then asks topk_problems)."""
    if not tops:
        return True
    block = stacked(tops)
    if block is None:
        return False
    return bool(_all_sound(*block, -1 if vocab_size is None else vocab_size, LOGPROB_SLACK, MASS_LIMIT))


@kernel
def _all_sound(ids, lps, vocab_size, slack, mass_limit):          # [N, K] int64, [N, K] float64
    n, k = ids.shape
    for r in range(n):
        mass = 0.0
        for j in range(k):
            t = ids[r, j]
            if t < 0 or (vocab_size >= 0 and t >= vocab_size):
                return False
            lp = lps[r, j]
            if not lp <= slack or lp == -np.inf:
                return False
            mass += np.exp(lp)
            for m in range(j):
                if ids[r, m] == t:
                    return False
        if mass > mass_limit:
            return False
    return True


@on_warm_up
def _warm_up() -> None:
    all_sound([TopK.of([1, 2], [-0.7, -1.4])], 8)
