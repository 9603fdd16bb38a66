"""Choose the next token from a mixed distribution: pure functions with an explicit RNG per request.

A mix is a distribution over the whole vocabulary: the candidate union (every selected expert's top-k) plus a
tail, every other token at one equal logprob (gating.mix_row.RowMix). Sampling draws from that whole
distribution, the one whose logprobs are reported: the tail is one more slot weighing as much as all its
tokens together, and a draw that lands there picks one of them uniformly. Nothing is truncated away unless the
request asks for it: temperature, top_k and top_p act on the whole distribution, as they would on the full
vocabulary (a top_k within the candidates leaves the tail out). temperature == 0 is greedy; ties break toward
the smaller token id. Each row draws from its own request's generator (numpy's PCG64: a draw is a plain call
that keeps the GIL, where a torch op would hand it to any busy thread of the process; docs/speed-history.md),
one row at a time, in Python floats (float64; a row is a few dozen candidates, less than torch's per-op dispatch
costs), so a seed gives the same text whatever else is running. A round's top-2 rows that sample plainly
(temperature > 0, no top_p, no top_k: what most requests ask) draw together from the round's pair-mix arrays
instead (`draw_pairs`, from DRAW_ROUND rows): the same rule and the same draws of each row's generator, in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gating.jit import kernel, on_warm_up
from gating.mix_pair import PairMix
from gating.mix_row import RoundMix, RowMix
from orchestrator.types import GenerationParams


def make_rng(seed: int | None) -> np.random.Generator:
    """A private generator per request: the same seed gives the same text, whatever else is running (no seed:
    fresh entropy from the OS). The API takes any seed in [-2**63, 2**64) and PCG64 only non-negative ones, so a
    seed is read as the unsigned 64-bit integer with the same bits (-1 is 2**64 - 1)."""
    return np.random.Generator(np.random.PCG64(None if seed is None else seed % 2**64))


def nucleus(probs: Sequence[float], top_p: float) -> list[float]:
    """The smallest set of tokens, by descending prob (ties: the first listed), whose mass reaches top_p; the
    others' probs set to 0 (not renormalised)."""
    kept = [0.0] * len(probs)
    before = 0.0                                                     # mass of strictly better tokens
    for i in sorted(range(len(probs)), key=probs.__getitem__, reverse=True):
        if before >= top_p or probs[i] <= 0:
            break
        kept[i] = probs[i]
        before += probs[i]
    return kept


def draw_weights(logprobs: Sequence[float], tail_logprob: float, tail_count: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0) -> tuple[list[float], float]:
    """The probability of drawing each candidate and the tail: softmax(logprob / T) over the whole vocabulary,
    then top-k (0: all), then the nucleus (vLLM's order). logprobs [C] (-inf: excluded), temperature > 0.

    A tail token is never likelier than a candidate (gating.mix), so top-k and the nucleus take the candidates
    first and reach into the tail only if they fall short: then they keep as many tail tokens as they need
    (equally likely, so which ones does not matter: the uniform draw inside the tail picks among all of them,
    which has the same distribution as a uniformly chosen kept subset)."""
    t = max(temperature, 1e-6)
    lp = [x / t for x in logprobs]
    tail_lp = tail_logprob / t
    count = float(tail_count)
    top = max([*lp, tail_lp] if count > 0 else lp)
    each = math.exp(tail_lp - top) if count > 0 else 0.0            # one tail token's weight
    cand = [math.exp(x - top) for x in lp]
    if top_k > 0:
        listed = sum(1 for c in cand if c > 0)
        if top_k <= listed:                                          # top-k ends among the candidates
            kth = sorted(cand, reverse=True)[top_k - 1]
            cand = [c if c >= kth else 0.0 for c in cand]            # (ties with the k-th kept, as vLLM)
            count = 0.0
        else:
            count = min(count, float(top_k - listed))
    z = sum(cand) + count * each
    cand, each = [c / z for c in cand], each / z
    if top_p < 1.0:
        cand = nucleus(cand, top_p)
        short = top_p - sum(cand)                                    # > 0 only when every candidate is kept
        count = min(float(math.ceil(short / max(each, 1e-300))) if short > 0 and each > 0 else 0.0, count)
    return cand, count * each


def sample_row(row: RowMix, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from the whole mixed distribution of one row, with the request's own generator."""
    if temperature == 0:                                             # greedy (a tail token is never better)
        best = max(row.logprobs)
        return min(t for t, lp in zip(row.ids, row.logprobs) if lp == best)
    cand, tail = draw_weights(row.logprobs, row.tail_logprob, row.tail_count, temperature, top_p, top_k)
    u = rng.random() * (sum(cand) + tail)                            # inverse CDF
    acc = 0.0
    for t, c in zip(row.ids, cand):
        acc += c
        if acc > u:
            return t
    if tail > 0:
        return draw_outside(row.ids, row.vocab_size, rng)
    return [t for t, c in zip(row.ids, cand) if c > 0][-1]           # u rounded up to the total


def draw_outside(ids: Sequence[int], vocab_size: int, rng: np.random.Generator) -> int:
    """A token id drawn uniformly from those of [0, vocab_size) not among ids."""
    taken = np.array(sorted({t for t in ids if 0 <= t < vocab_size}), dtype=np.int64)
    index = int(rng.integers(vocab_size - len(taken)))              # index among the free ids
    return int(nth_free(taken[None], np.ones((1, len(taken)), dtype=bool), np.array([index]))[0])


def draw_pairs(logprobs: np.ndarray, keep: np.ndarray, tail: np.ndarray, n_tail: np.ndarray,
               temperatures: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """sample_row's draw for n rows at once, without top_p or top_k: softmax(logprob / T) over the candidates and
    the tail, then the inverse CDF at uniforms [n] in [0, 1), candidates in slot order.

    logprobs / keep [n, C] (a slot with keep False is not a candidate), tail [n] (one tail token's logprob),
    n_tail [n] (tail tokens), temperatures [n] > 0 -> [n] the drawn slot, or -1 for the tail. One compiled
    kernel (gating/jit.py: 9 µs for 32 rows on an idle core, against 41 as a numpy program)."""
    slot = np.empty(len(uniforms), dtype=np.int64)
    _draw_rows(np.ascontiguousarray(logprobs, dtype=np.float64), np.ascontiguousarray(keep, dtype=bool),
               np.ascontiguousarray(tail, dtype=np.float64), np.ascontiguousarray(n_tail, dtype=np.int64),
               np.ascontiguousarray(temperatures, dtype=np.float64), np.ascontiguousarray(uniforms, dtype=np.float64),
               slot)
    return slot


@kernel
def _draw_rows(logprobs, keep, tail, n_tail, temperatures, uniforms, slot):  # pragma: no cover
    n, c = logprobs.shape
    weight = np.empty(c)
    for r in range(n):
        t = max(temperatures[r], 1e-6)
        tail_lp = tail[r] / t
        count = float(n_tail[r])
        top = tail_lp if count > 0 else -np.inf
        for j in range(c):
            if keep[r, j] and logprobs[r, j] / t > top:
                top = logprobs[r, j] / t
        each = math.exp(tail_lp - top) if count > 0 else 0.0           # one tail token's weight
        z = count * each
        for j in range(c):
            weight[j] = math.exp(logprobs[r, j] / t - top) if keep[r, j] else 0.0
            z += weight[j]
        total = 0.0
        for j in range(c):
            weight[j] /= z
            total += weight[j]
        tail_w = count * (each / z)
        u = uniforms[r] * (total + tail_w)                               # inverse CDF
        acc, got = 0.0, -1
        for j in range(c):
            acc += weight[j]
            if acc > u:
                got = j
                break
        if got < 0 and not tail_w > 0:          # u rounded up to the total, no tail: the last candidate
            for j in range(c - 1, -1, -1):
                if weight[j] > 0:
                    got = j
                    break
        slot[r] = got


@on_warm_up
def _warm_up() -> None:
    draw_pairs(np.zeros((1, 2)), np.ones((1, 2), dtype=bool), np.zeros(1), np.ones(1, dtype=np.int64), np.ones(1),
               np.full(1, 0.5))


# Plain rows of a pair group from which drawing them together beats row by row: one row of a top-2 mix draws in
# 8 µs through its RowMix and sample_row, in 20 through the group's arrays (idle core, 2026-12-06), whose fixed
# cost is a dozen numpy calls.
DRAW_ROUND = 3


def plain(p: GenerationParams) -> bool:
    """A draw from the whole distribution at a temperature: what draw_pairs does."""
    return p.temperature > 0 and p.top_p >= 1.0 and p.top_k == 0


def nth_free(ids: np.ndarray, keep: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The index-th id (ascending) of [0, vocab) not among a row's kept ids, for many rows (draw_outside: one).
    ids / keep [m, C] (kept ids distinct), index [m] -> [m]. With the kept ids sorted, t_0 < t_1 < ..., the answer
    is index + #{i : t_i - i <= index} (t_i - i never decreases, and each such t_i is one id skipped)."""
    taken = np.sort(np.where(keep, ids, np.iinfo(np.int64).max // 2), 1)
    return index + (taken - np.arange(ids.shape[1]) <= index[:, None]).sum(1)


def sample_round(mixed: RoundMix, params: Sequence[GenerationParams],
                 rngs: Sequence[np.random.Generator]) -> list[tuple[int, float]]:
    """(token id, its logprob under the mix) for every row of a round, each from its own request's generator.

    The plain rows of a pair group draw together (draw_pairs) when there are DRAW_ROUND of them; every other row
    through its RowMix (sample_row).
    Either way a row takes the same draws from its generator (one uniform, and one more for a tail token)."""
    out: list[tuple[int, float] | None] = [None] * len(mixed)
    for members, pm in mixed.pairs:
        rows = [r for r, j in enumerate(members) if plain(params[j])]
        if len(rows) >= DRAW_ROUND:
            round_rows = [members[r] for r in rows]
            for j, got in zip(round_rows, _draw_group(pm, rows, round_rows, params, rngs, mixed.vocab_size)):
                out[j] = got
    for j, got in enumerate(out):
        if got is None:
            row, p = mixed.row(j), params[j]
            token = sample_row(row, p.temperature, p.top_p, p.top_k, rngs[j])
            out[j] = (token, row.logprob_of(token))
    return out  # type: ignore[return-value]


def _draw_group(pm: PairMix, rows: list[int], round_rows: list[int], params: Sequence[GenerationParams],
                rngs: Sequence[np.random.Generator], vocab_size: int) -> list[tuple[int, float]]:
    uniforms = np.array([rngs[j].random() for j in round_rows])
    temperatures = np.array([params[j].temperature for j in round_rows], dtype=np.float64)
    arrays = (pm.ids, pm.logprobs, pm.keep, pm.tail, pm.n_tail)
    ids, logprobs, keep, tail, n_tail = arrays if len(rows) == len(pm.tail) else (a[rows] for a in arrays)
    slot = draw_pairs(logprobs, keep, tail, n_tail, temperatures, uniforms)
    at = np.maximum(slot, 0)[:, None]
    tokens = np.take_along_axis(ids, at, 1)[:, 0]
    in_tail = slot < 0
    if in_tail.any():                                   # one more draw each: which tail token (draw_outside)
        t = np.flatnonzero(in_tail)
        index = np.array([int(rngs[round_rows[x]].integers(int(n_tail[x]))) for x in t])
        tokens[t] = nth_free(ids[t], keep[t], index)
    logprob = np.where(in_tail, tail, np.take_along_axis(logprobs, at, 1)[:, 0])
    return list(zip(tokens.tolist(), logprob.tolist()))
