"""The served top-2 mix of a whole round at once: gating.mix's rule for rows of exactly two experts, compiled.

Why: a top-2 round at concurrency 32 mixes 32 rows. The general batched form (gating.mix.mix) matches every
candidate against every listed id of every expert ([R, S, C, K] and [R, C, C] boolean tensors) in ~45 torch
ops; inside the busy gateway replica that was 75 µs per generated token, a third of the orchestration time.
With two experts the only question per candidate is whether the other expert lists it too. As a numpy program
over [R, K] arrays (until 2026-12-05) that was still ~40 ops, 145 µs a round of 32 rows on an idle core; one
numba kernel (gating/jit.py) loops over the rows in 22 µs. The result stays in arrays (PairMix,
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

from gating.jit import kernel, on_warm_up
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
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty((rows, 2 * k))
    keep = np.empty((rows, 2 * k), dtype=bool)
    tail = np.empty(rows)
    n_tail = np.empty(rows, dtype=np.int64)
    _mix_rows(ids, np.ascontiguousarray(logprobs, dtype=np.float64), np.ascontiguousarray(weights, dtype=np.float64),
              vocab_size, space == "logits", float(interp), out, keep, tail, n_tail)
    return PairMix(ids.reshape(rows, 2 * k), out, keep, tail, n_tail)


@kernel
def _mix_rows(ids, lps, weights, vocab_size, logits_space, interp, out, keep, tail_out, n_tail_out):  # pragma: no cover
    """The mix of every row (gating.mix's rule for two experts), into out / keep / tail_out / n_tail_out.

    Per row, in numbered steps as gating.mix: 1) which candidates both experts list; 2) each expert's floor and
    its guess for the likely tokens it did not list; 3) both experts' values on each slot (the first's K, then
    the second's K); 4) combined in the mix space, the tail likewise, normalised over candidates plus tail."""
    rows, _, k = ids.shape
    in1 = np.empty(k, np.bool_)              # the first's slot j is listed by the second too
    in0 = np.empty(k, np.bool_)              # the second's slot j is listed by the first too
    at0 = np.empty(k)                        # the second's logprob of the first's slot j (if listed)
    v0 = np.empty(2 * k)
    v1 = np.empty(2 * k)
    log_unlisted = math.log(max(vocab_size - k, 1))
    for r in range(rows):
        w0, w1 = weights[r, 0], weights[r, 1]
        # 1) which candidates both experts list
        for j in range(k):
            in1[j], in0[j], at0[j] = False, False, 0.0
        for j in range(k):
            for j2 in range(k):
                if ids[r, 1, j2] == ids[r, 0, j]:
                    in1[j], in0[j2] = True, True
                    at0[j] += lps[r, 1, j2]
        # 2) floors, and the guesses for the other's candidates
        mass0, mass1 = 0.0, 0.0
        for j in range(k):
            mass0 += math.exp(lps[r, 0, j])
            mass1 += math.exp(lps[r, 1, j])
        left0, left1 = max(1.0 - mass0, MIN_LEFTOVER), max(1.0 - mass1, MIN_LEFTOVER)
        floor0, floor1 = math.log(left0) - log_unlisted, math.log(left1) - log_unlisted
        if interp <= 0:
            guess0, guess1, new0, new1 = floor0, floor1, floor0, floor1
        else:
            only1, only0 = 0, 0
            for j in range(k):
                only1 += not in0[j]
                only0 += not in1[j]
            raised0 = float(only1) if w1 > 0 else 0.0          # tokens the first must guess for
            raised1 = float(only0) if w0 > 0 else 0.0
            guess0 = floor0 + interp * max(lps[r, 0, k - 1] - floor0, 0.0)
            guess1 = floor1 + interp * max(lps[r, 1, k - 1] - floor1, 0.0)
            guess0 = min(guess0, math.log(0.5 * left0 / max(raised0, 1.0)))
            guess1 = min(guess1, math.log(0.5 * left1 / max(raised1, 1.0)))
            new0 = math.log(max(left0 - raised0 * math.exp(guess0), MIN_LEFTOVER)) \
                - math.log(max(vocab_size - k - raised0, 1.0))
            new1 = math.log(max(left1 - raised1 * math.exp(guess1), MIN_LEFTOVER)) \
                - math.log(max(vocab_size - k - raised1, 1.0))
            if not w1 > 0:              # a token only a weight-0 expert listed is an ordinary unlisted token
                guess0 = new0
            if not w0 > 0:
                guess1 = new1
        # 3) both experts' values on each slot
        for j in range(k):
            v0[j], v0[k + j] = lps[r, 0, j], guess0
            v1[j], v1[k + j] = (at0[j] if in1[j] else guess1), lps[r, 1, j]
        # 4) combine, then normalise over the kept slots and the tail
        if logits_space:
            for j in range(2 * k):
                out[r, j] = w0 * v0[j] + w1 * v1[j]
            tail = w0 * new0 + w1 * new1
        else:
            lw0, lw1 = math.log(max(w0, 1e-30)), math.log(max(w1, 1e-30))
            for j in range(2 * k):
                out[r, j] = np.logaddexp(v0[j] + lw0, v1[j] + lw1)
            tail = np.logaddexp(new0 + lw0, new1 + lw1)
        kept = 0
        for j in range(k):
            keep[r, j], keep[r, k + j] = True, not in0[j]
            kept += 2 - in0[j]
        n_tail = vocab_size - kept
        tail_mass = tail + math.log(n_tail) if n_tail > 0 else -np.inf
        top = tail_mass
        for j in range(2 * k):
            if keep[r, j] and out[r, j] > top:
                top = out[r, j]
        z = math.exp(tail_mass - top)
        for j in range(2 * k):
            if keep[r, j]:
                z += math.exp(out[r, j] - top)
        log_z = top + math.log(z)
        for j in range(2 * k):
            out[r, j] -= log_z
        tail_out[r] = tail - log_z
        n_tail_out[r] = n_tail


@on_warm_up
def _warm_up() -> None:
    ids = np.array([[[1, 2], [2, 3]]], dtype=np.int64)
    lps = np.log(np.array([[[0.5, 0.25], [0.5, 0.25]]]))
    for space in MIX_SPACES:
        mix_pair_arrays(ids, lps, np.array([[0.5, 0.5]]), 8, space)
