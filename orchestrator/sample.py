"""Choose the next token from a mixed distribution: pure functions with an explicit RNG per request.

A mix is a distribution over the whole vocabulary: the candidate union (every selected expert's top-k) plus a
tail, every other token at one equal logprob (gating.mix_row.RowMix). Sampling draws from that whole
distribution, the one whose logprobs are reported: the tail is one more slot weighing as much as all its
tokens together, and a draw that lands there picks one of them uniformly. Nothing is truncated away unless the
request asks for it: temperature, top_k and top_p act on the whole distribution, as they would on the full
vocabulary (a top_k within the candidates leaves the tail out). temperature == 0 is greedy; ties break toward
the smaller token id. Each row draws from its own request's generator, one row at a time, in Python floats
(float64; a row is a few dozen candidates, less than torch's per-op dispatch costs), so a seed gives the same
text whatever else is running.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gating.mix_row import RowMix


def make_rng(seed: int | None) -> torch.Generator:
    """A private generator per request: the same seed gives the same text, whatever else is running."""
    rng = torch.Generator()
    rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return rng


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


def sample_row(row: RowMix, temperature: float, top_p: float, top_k: int, rng: torch.Generator) -> int:
    """One token id from the whole mixed distribution of one row, with the request's own generator."""
    if temperature == 0:                                             # greedy (a tail token is never better)
        best = max(row.logprobs)
        return min(t for t, lp in zip(row.ids, row.logprobs) if lp == best)
    cand, tail = draw_weights(row.logprobs, row.tail_logprob, row.tail_count, temperature, top_p, top_k)
    u = float(torch.rand((), generator=rng, dtype=torch.float64)) * (sum(cand) + tail)   # inverse CDF
    acc = 0.0
    for t, c in zip(row.ids, cand):
        acc += c
        if acc > u:
            return t
    if tail > 0:
        return draw_outside(row.ids, row.vocab_size, rng)
    return [t for t, c in zip(row.ids, cand) if c > 0][-1]           # u rounded up to the total


def draw_outside(ids: Sequence[int], vocab_size: int, rng: torch.Generator) -> int:
    """A token id drawn uniformly from those of [0, vocab_size) not among ids."""
    taken = sorted({t for t in ids if 0 <= t < vocab_size})
    token = int(torch.randint(vocab_size - len(taken), (), generator=rng))   # index among the free ids
    for t in taken:                                                  # the token-th free id, ascending
        if t > token:
            break
        token += 1
    return token
