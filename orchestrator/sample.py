"""Choose the next token from mixed distributions: pure functions with an explicit RNG per row.

A mix is a distribution over the whole vocabulary: the candidate union (every selected expert's top-k) plus a
tail, every other token at one equal logprob (gating.mix). Sampling draws from that whole distribution, the
one whose logprobs are reported: the tail is one more slot weighing as much as all its tokens together, and a
draw that lands there picks one of them uniformly. Nothing is truncated away unless the request asks for it:
temperature, top_k and top_p act on the whole distribution, as they would on the full vocabulary (a top_k
within the candidates leaves the tail out). temperature == 0 is greedy; ties break toward the smaller token
id. A batch of rows is sampled at once; each row draws from its own request's generator, so a seed gives the
same text whatever else is running.

Shape legend: B = rows (sequences), C = candidate slots, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from gating.mix import Mixed


class Tail(NamedTuple):
    """The tokens outside the candidates: each has the same logprob under the mix."""
    logprob: torch.Tensor   # [B] log p of each single tail token
    count: torch.Tensor     # [B] how many tail tokens there are (V minus the distinct candidates)
    vocab_size: int


def tail_of(mixed: Mixed, vocab_size: int) -> Tail:
    return Tail(mixed.tail_logprob, vocab_size - mixed.first.sum(-1), vocab_size)


def make_rng(seed: int | None) -> torch.Generator:
    """A private generator per request: the same seed gives the same text, whatever else is running."""
    rng = torch.Generator()
    rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return rng


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """probs [..., C], top_p [...] or a float -> bool keep-mask [..., C]: per row the smallest set, by
    descending prob, whose mass reaches top_p."""
    top_p = torch.as_tensor(top_p, dtype=probs.dtype).expand(probs.shape[:-1])
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    sorted_probs = probs.gather(-1, order)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs              # mass of strictly better tokens
    keep_sorted = mass_before < top_p[..., None]                      # always keeps the best token
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep & (probs > 0)


def draw_weights(cand_logprobs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None,
                 tail: Tail | None, top_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability of drawing each candidate and the tail: softmax(logprob / T) over the whole vocabulary,
    then top-k, then the nucleus (vLLM's order). cand_logprobs [B, C] (-inf: excluded), temperature [B] (> 0),
    top_p [B] or None (1), top_k [B] long or None (0: all) -> (candidates [B, C], tail [B]), float64.

    A tail token is never likelier than a candidate (gating.mix), so top-k and the nucleus take the candidates
    first and reach into the tail only if they fall short: then they keep as many tail tokens as they need
    (equally likely, so which ones does not matter: the uniform draw inside the tail picks among all of them,
    which has the same distribution as a uniformly chosen kept subset)."""
    lp = cand_logprobs.double() / temperature.double().clamp_min(1e-6)[:, None]               # [B, C]
    if tail is None:
        each = torch.zeros(lp.shape[0], dtype=torch.float64)
        count = torch.zeros_like(each)
        top = lp.max(-1).values
    else:
        tail_lp = tail.logprob.double() / temperature.double().clamp_min(1e-6)               # [B]
        count = tail.count.double()
        top = torch.maximum(lp.max(-1).values, torch.where(count > 0, tail_lp, float("-inf")))
        each = torch.where(count > 0, (tail_lp - top).exp(), 0.0)
    cand = (lp - top[:, None]).exp()
    if top_k is not None:
        listed = (cand > 0).sum(-1)                                                           # [B]
        kth = cand.sort(-1, descending=True).values.gather(1, (top_k.clamp(1, cand.shape[1]) - 1)[:, None])
        inside = (top_k > 0) & (top_k <= listed)                       # top-k ends among the candidates
        cand = torch.where(inside[:, None] & (cand < kth), 0.0, cand)  # (ties with the k-th kept, as vLLM)
        count = torch.where(inside, 0.0, torch.where(top_k > 0, torch.minimum(count, (top_k - listed).double()),
                                                     count))
    z = cand.sum(-1) + count * each
    cand, each = cand / z[:, None], each / z
    if top_p is not None:
        top_p = top_p.double()
        cand = torch.where(nucleus_mask(cand, top_p), cand, 0.0)
        short = top_p - cand.sum(-1)                                   # > 0 only when every candidate is kept
        kept = torch.where((short > 0) & (each > 0), torch.ceil(short / each.clamp_min(1e-300)), 0.0)
        count = torch.minimum(kept, count)
    return cand, count * each


def sample_rows(cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, temperature: Sequence[float],
                top_p: Sequence[float], rngs: Sequence[torch.Generator], tail: Tail | None = None,
                top_k: Sequence[int] | None = None) -> list[int]:
    """cand_ids [B, C] long, cand_logprobs [B, C] (-inf for excluded slots) -> one token id per row; with
    `tail`, from the whole distribution (candidates and tail), else from the candidates only."""
    b, c = cand_ids.shape
    greedy = [t == 0 for t in temperature]
    out: list[int | None] = [None] * b
    if any(greedy):
        # Greedy: the best logprob; among equals, the smallest id (a tail token is never better than a candidate).
        lp = cand_logprobs
        best = lp.max(-1, keepdim=True).values                                    # [B, 1]
        big = torch.iinfo(torch.long).max
        greedy_ids = torch.where(lp == best, cand_ids, torch.full_like(cand_ids, big)).min(-1).values.tolist()
        for i in range(b):
            if greedy[i]:
                out[i] = greedy_ids[i]
    sampled = [i for i in range(b) if not greedy[i]]
    if sampled:
        # The draw weights, then inverse CDF with one uniform draw from each row's own RNG; one batched search.
        nucleus = torch.tensor(top_p, dtype=torch.float64) if any(p < 1.0 for p in top_p) else None
        limit = torch.tensor(top_k, dtype=torch.long) if top_k is not None and any(top_k) else None
        cand, tail_w = draw_weights(cand_logprobs, torch.tensor(temperature, dtype=torch.float64), nucleus, tail,
                                    limit)
        cdf = torch.cat([cand, tail_w[:, None]], 1).cumsum(-1)                    # [B, C + 1]
        u = torch.zeros(b, 1, dtype=torch.float64)
        for i in sampled:
            u[i, 0] = torch.rand((), generator=rngs[i], dtype=torch.float64)
        last = c if tail is not None else c - 1                                   # slot c: the tail
        picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(last)[:, 0]   # [B]
        ids = cand_ids.gather(1, picks.clamp_max(c - 1)[:, None])[:, 0].tolist()
        in_tail = (picks == c).tolist()
        for i in sampled:
            out[i] = draw_outside(cand_ids[i], tail.vocab_size, rngs[i]) if in_tail[i] else ids[i]
    return out  # type: ignore[return-value]


def sample_mixed(mixed: Mixed, vocab_size: int, temperature: Sequence[float], top_p: Sequence[float],
                 rngs: Sequence[torch.Generator], top_k: Sequence[int] | None = None) -> list[int]:
    """One token per row of a mix, drawn from the whole mixed distribution (the one its logprobs report)."""
    return sample_rows(mixed.cand_ids, mixed.cand_logprobs, temperature, top_p, rngs, tail_of(mixed, vocab_size),
                       top_k)


def draw_outside(cand_ids: torch.Tensor, vocab_size: int, rng: torch.Generator) -> int:
    """A token id drawn uniformly from those not among cand_ids [C] (one row's candidates)."""
    taken = torch.zeros(vocab_size, dtype=torch.bool)
    taken[cand_ids[cand_ids >= 0]] = True
    free = (~taken).nonzero()[:, 0]
    return int(free[torch.randint(len(free), (), generator=rng)])


def sample_token(cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, temperature: float, top_p: float,
                 rng: torch.Generator) -> int:
    """One row: cand_ids [C] long, cand_logprobs [C] -> chosen token id (candidates only)."""
    return sample_rows(cand_ids[None], cand_logprobs[None], [temperature], [top_p], [rng])[0]


def top_alternatives(mixed: Mixed, row: int, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, logprob) pairs of one row of a mix, for `top_logprobs`."""
    if n <= 0:
        return ()
    lp = mixed.cand_logprobs[row]
    n = min(n, int(mixed.first[row].sum().item()))
    values, idx = lp.topk(n)
    return tuple((int(mixed.cand_ids[row, i]), float(v)) for i, v in zip(idx.tolist(), values.tolist()))
