"""Choose the next token from a mixed distribution: pure functions with an explicit RNG.

Sampling is over the candidate union (tokens outside every selected expert's top-k are never sampled:
an implicit top-k truncation). temperature == 0 is greedy; ties break toward the smaller token id.
"""

from __future__ import annotations

import torch

from gating.mix import Mixed


def make_rng(seed: int | None) -> torch.Generator:
    """A private generator per request: the same seed gives the same text, whatever else is running."""
    rng = torch.Generator()
    rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return rng


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[C] probs -> [C] bool keep-mask: the smallest set, by descending prob, whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs > 0
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    mass_before = sorted_probs.cumsum(0) - sorted_probs               # mass of strictly better tokens
    keep_sorted = mass_before < top_p                                 # always keeps the best token
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep & (probs > 0)


def sample_token(
    cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator
) -> int:
    """cand_ids [C] long, cand_logprobs [C] (-inf for excluded slots) -> chosen token id."""
    if temperature == 0.0:
        best = cand_logprobs.max()
        return int(cand_ids[cand_logprobs == best].min().item())
    probs = torch.softmax(cand_logprobs.double() / temperature, dim=0)
    probs = torch.where(nucleus_mask(probs, top_p), probs, torch.zeros_like(probs))
    index = torch.multinomial(probs / probs.sum(), 1, generator=rng)
    return int(cand_ids[index].item())


def top_alternatives(mixed: Mixed, row: int, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, logprob) pairs of one row of a mix, for `top_logprobs`."""
    if n <= 0:
        return ()
    lp = mixed.cand_logprobs[row]
    n = min(n, int(mixed.first[row].sum().item()))
    values, idx = lp.topk(n)
    return tuple((int(mixed.cand_ids[row, i]), float(v)) for i, v in zip(idx.tolist(), values.tolist()))
