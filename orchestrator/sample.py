"""Choose the next token from mixed distributions: pure functions with an explicit RNG per row.

Sampling is over the candidate union (tokens outside every selected expert's top-k are never sampled: an
implicit top-k truncation). temperature == 0 is greedy; ties break toward the smaller token id. A batch of
rows is sampled at once; each row draws from its own request's generator, so a seed gives the same text
whatever else is running.

Shape legend: B = rows (sequences), C = candidate slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gating.mix import Mixed


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


def sample_rows(cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, temperature: Sequence[float],
                top_p: Sequence[float], rngs: Sequence[torch.Generator]) -> list[int]:
    """cand_ids [B, C] long, cand_logprobs [B, C] (-inf for excluded slots) -> one token id per row."""
    b, c = cand_ids.shape
    greedy = [t == 0 for t in temperature]
    lp = cand_logprobs.double()
    out: list[int | None] = [None] * b
    if any(greedy):
        # Greedy: the best logprob; among equals, the smallest id.
        best = lp.max(-1, keepdim=True).values                                    # [B, 1]
        big = torch.iinfo(torch.long).max
        greedy_ids = torch.where(lp == best, cand_ids, torch.full_like(cand_ids, big)).min(-1).values.tolist()
        for i in range(b):
            if greedy[i]:
                out[i] = greedy_ids[i]
    sampled = [i for i in range(b) if not greedy[i]]
    if sampled:
        # softmax(lp / T), nucleus (only where a row asks for it), then inverse CDF with one uniform draw from
        # each row's own RNG; one batched search for all rows.
        temps = torch.tensor(temperature, dtype=torch.float64)                    # [B]
        probs = torch.softmax(lp / temps.clamp_min(1e-6)[:, None], dim=-1)        # [B, C]
        if any(p < 1.0 for p in top_p):
            probs = torch.where(nucleus_mask(probs, torch.tensor(top_p, dtype=torch.float64)), probs, 0.0)
        cdf = probs.cumsum(-1)                                                    # [B, C]
        u = torch.zeros(b, 1, dtype=torch.float64)
        for i in sampled:
            u[i, 0] = torch.rand((), generator=rngs[i], dtype=torch.float64)
        picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(c - 1)[:, 0]   # [B]
        ids = cand_ids.gather(1, picks[:, None])[:, 0].tolist()
        for i in sampled:
            out[i] = ids[i]
    return out  # type: ignore[return-value]


def sample_token(cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, temperature: float, top_p: float,
                 rng: torch.Generator) -> int:
    """One row: cand_ids [C] long, cand_logprobs [C] -> chosen token id."""
    return sample_rows(cand_ids[None], cand_logprobs[None], [temperature], [top_p], [rng])[0]


def top_alternatives(mixed: Mixed, row: int, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, logprob) pairs of one row of a mix, for `top_logprobs`."""
    if n <= 0:
        return ()
    lp = mixed.cand_logprobs[row]
    n = min(n, int(mixed.first[row].sum().item()))
    values, idx = lp.topk(n)
    return tuple((int(mixed.cand_ids[row, i]), float(v)) for i, v in zip(idx.tolist(), values.tolist()))
