"""The served top-2 mix of a whole round at once: gating.mix's rule for rows of exactly two experts, in numpy.

Why: a top-2 round at concurrency 32 mixes 32 rows. The general batched form (gating.mix.mix) matches every
candidate against every listed id of every expert ([R, S, C, K] and [R, C, C] boolean tensors) in ~45 torch
ops; inside the busy gateway replica that was 75 µs per generated token, a third of the orchestration time.
With two experts the only question per candidate is whether the other expert lists it too, one [R, K, K]
comparison, and the rest is arithmetic on [R, K] arrays. The result stays in arrays (PairMix,
`mix_pair_arrays`), so that the sampler can draw for the whole round at once; `mix_pairs` gives it as lists.

The rule is gating.mix's, step for step (its module docstring explains the floor and the cross-listed guess).
Everything is float64; tests/unit/test_mix_pair.py checks it against mix_row (Python floats) and the torch
form over random rows with shared and disjoint candidates, zero weights, both spaces, with and without the
cross-listed guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import compress

import numpy as np

from gating.mix import CROSS_LISTED_INTERP, MIN_LEFTOVER, MIX_SPACES


@dataclass(frozen=True)
class PairMix:
    """A round of mixed top-2 rows as arrays. Slot order is first-listed order: the first expert's K by rank,
    then the second's K; a slot of the second expert that the first also lists is not a candidate (`keep`
    False, its logprob meaningless). Every token outside a row's candidates has logprob `tail`."""
    ids: np.ndarray          # [R, 2K] int64
    logprobs: np.ndarray     # [R, 2K] float64, normalised log p_mix of each kept slot
    keep: np.ndarray         # [R, 2K] bool
    tail: np.ndarray         # [R] float64
    n_tail: np.ndarray       # [R] int64, vocab_size - number of candidates

    def candidates(self, r: int) -> tuple[list[int], list[float]]:
        """Row r's distinct candidate ids in first-listed order, and their logprobs."""
        keep = self.keep[r].tolist()
        return list(compress(self.ids[r].tolist(), keep)), list(compress(self.logprobs[r].tolist(), keep))


def mix_pairs(ids: np.ndarray, logprobs: np.ndarray, weights: np.ndarray, vocab_size: int, space: str,
              *, interp: float | None = None) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """Mix rows of two experts' top-k. ids [R, 2, K] int64 (unique within an expert), logprobs [R, 2, K]
    float64 (descending), weights [R, 2] summing to 1.

    -> per row: its distinct candidate ids in first-listed order (the first expert's K by rank, then the
    second's that the first did not list), their normalised mixed logprobs, and the logprob of each other token.
    """
    m = mix_pair_arrays(ids, logprobs, weights, vocab_size, space, interp=interp)
    rows = [m.candidates(r) for r in range(len(m.tail))]
    return [c for c, _ in rows], [lp for _, lp in rows], m.tail.tolist()


def mix_pair_arrays(ids: np.ndarray, logprobs: np.ndarray, weights: np.ndarray, vocab_size: int, space: str,
                    *, interp: float | None = None) -> PairMix:
    """mix_pairs' arithmetic, left as arrays (a sampler that draws for the whole round reads them as they are)."""
    if space not in MIX_SPACES:
        raise ValueError(f"mix space must be one of {MIX_SPACES}, got {space!r}")
    interp = CROSS_LISTED_INTERP if interp is None else interp
    rows, _, k = ids.shape
    ids0, ids1 = ids[:, 0], ids[:, 1]                                   # [R, K]
    lp0, lp1 = logprobs[:, 0], logprobs[:, 1]
    w0, w1 = weights[:, 0], weights[:, 1]                               # [R]

    # 1) which candidates both experts list
    same = ids0[:, :, None] == ids1[:, None, :]                          # [R, K, K]
    in1 = same.any(2)                                                    # first's token j listed by the second
    in0 = same.any(1)                                                    # second's token j listed by the first
    lp1_at0 = np.where(same, lp1[:, None, :], 0.0).sum(2)                # [R, K] the second's value there

    # 2) each expert's floor, and its guess for the likely tokens it did not list (the other's, if weighted)
    leftover = np.maximum(1.0 - np.exp(logprobs).sum(2), MIN_LEFTOVER)  # [R, 2]
    floor = np.log(leftover) - math.log(max(vocab_size - k, 1))
    only1 = ~in0                                                         # [R, K] the second's own candidates
    if interp <= 0:
        guess, new_floor = floor, floor
    else:
        n_raised = np.stack([np.where(w1 > 0, only1.sum(1), 0), np.where(w0 > 0, (~in1).sum(1), 0)], 1)
        n_raised = n_raised.astype(np.float64)                           # [R, 2]
        guess = floor + interp * np.maximum(logprobs[:, :, -1] - floor, 0.0)
        guess = np.minimum(guess, np.log(0.5 * leftover / np.maximum(n_raised, 1.0)))
        rest = np.maximum(leftover - n_raised * np.exp(guess), MIN_LEFTOVER)
        new_floor = np.log(rest) - np.log(np.maximum(vocab_size - k - n_raised, 1.0))
        # a token only a weight-0 expert listed is an ordinary unlisted token for the other
        guess = np.stack([np.where(w1 > 0, guess[:, 0], new_floor[:, 0]),
                          np.where(w0 > 0, guess[:, 1], new_floor[:, 1])], 1)

    # 3) both experts' values on each candidate: the first's K, then the second's K (the shared ones masked)
    v0 = np.concatenate([lp0, np.broadcast_to(guess[:, :1], (rows, k))], 1)                      # [R, 2K]
    v1 = np.concatenate([np.where(in1, lp1_at0, guess[:, 1:2]), lp1], 1)

    # 4) combine in the mix space, the tail likewise, and normalise over candidates plus tail
    if space == "logits":
        score = w0[:, None] * v0 + w1[:, None] * v1
        tail = w0 * new_floor[:, 0] + w1 * new_floor[:, 1]
    else:
        lw0, lw1 = np.log(np.maximum(w0, 1e-30)), np.log(np.maximum(w1, 1e-30))
        score = np.logaddexp(v0 + lw0[:, None], v1 + lw1[:, None])
        tail = np.logaddexp(new_floor[:, 0] + lw0, new_floor[:, 1] + lw1)
    keep = np.concatenate([np.ones_like(in1), only1], 1)                                           # [R, 2K]
    n_tail = vocab_size - keep.sum(1)
    with np.errstate(divide="ignore"):
        tail_mass = np.where(n_tail > 0, tail + np.log(np.maximum(n_tail, 1)), -np.inf)
        masked = np.where(keep, score, -np.inf)
    top = np.maximum(masked.max(1), tail_mass)
    log_z = top + np.log(np.exp(masked - top[:, None]).sum(1) + np.exp(tail_mass - top))
    return PairMix(ids.reshape(rows, 2 * k), score - log_z[:, None], keep, tail - log_z, n_tail)
