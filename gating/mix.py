"""Mix the top-k next-token distributions of the selected experts: the one function serving and training share.

Input is each selected expert's top-k (ids, logprobs); output is a normalised distribution over the full
vocabulary, represented as the union of the candidates plus one `tail` logprob for every other token.

Shape legend:  B = positions (tokens or sequences), S = selected experts, K = top-k per expert,
               C = S*K candidate slots, V = vocabulary size.

Floor (a token missing from an expert's top-k): that expert's leftover mass spread evenly over the V-K
tokens it did not list, floor = log((1 - sum(p_topk)) / (V - K)). It never exceeds the k-th logprob (the
mean of the unlisted tokens cannot exceed their maximum), it keeps each expert a proper distribution, and
so with weights (1, 0) the mix reproduces that expert's distribution exactly, in either mixing space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

MixSpace = Literal["logits", "probs"]
MIX_SPACES: tuple[str, ...] = ("logits", "probs")
MIN_LEFTOVER = 1e-6  # top-k mass can round to >= 1; keep the floor finite
# Guess for a token another weighted expert listed, between the floor (0) and the k-th logprob (1); measured
# against exact full-vocabulary mixing (gating/floor_study.py, README "Quality"). 0 = the plain floor.
# 0.75 beats 0 on both held-out splits in both spaces (logits: 509 -> 457 on the independent split).
CROSS_LISTED_INTERP = 0.75


@dataclass(frozen=True)
class Mixed:
    cand_ids: torch.Tensor        # [B, C] long, candidate token ids (duplicates possible, see `first`)
    cand_logprobs: torch.Tensor   # [B, C] normalised log p_mix; duplicates carry -inf
    first: torch.Tensor           # [B, C] bool, True on the first occurrence of each id
    tail_logprob: torch.Tensor    # [B] log p_mix of any single token outside the candidates


def expert_floor(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., K] top-k logprobs -> [...] floor logprob of each unlisted token."""
    k = logprobs.shape[-1]
    leftover = (1.0 - logprobs.exp().sum(-1)).clamp_min(MIN_LEFTOVER)
    return leftover.log() - math.log(max(vocab_size - k, 1))


def values_under_experts(
    query: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, floor: torch.Tensor
) -> torch.Tensor:
    """Logprob each selected expert gives each query token: its top-k value, else its floor.

    query [B, Q] long, ids/logprobs [B, S, K], floor [B, S] -> [B, S, Q]
    """
    match = query[:, None, :, None] == ids[:, :, None, :]             # [B, S, Q, K]
    listed = match.any(-1)                                             # [B, S, Q]
    value = (match * logprobs[:, :, None, :]).sum(-1)                  # ids are unique within an expert
    return torch.where(listed, value, floor[:, :, None])


def combine(values: torch.Tensor, weights: torch.Tensor, space: MixSpace) -> torch.Tensor:
    """Unnormalised mixed log-score. values [B, S, Q], weights [B, S] -> [B, Q]."""
    if space == "logits":
        return (weights[:, :, None] * values).sum(1)                   # Σ wᵢ·logpᵢ
    if space == "probs":
        return torch.logsumexp(values + weights.clamp_min(1e-30).log()[:, :, None], dim=1)  # log Σ wᵢ·pᵢ
    raise ValueError(f"mix space must be one of {MIX_SPACES}, got {space!r}")


def first_occurrence(cand: torch.Tensor) -> torch.Tensor:
    """[B, C] ids -> [B, C] bool, True where the id did not appear earlier in the row."""
    c = cand.shape[-1]
    same = cand[:, :, None] == cand[:, None, :]                       # [B, C, C]
    earlier = torch.ones(c, c, dtype=torch.bool, device=cand.device).tril(-1)
    return ~(same & earlier).any(-1)


def cross_listed_values(
    cand: torch.Tensor, first: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, weights: torch.Tensor,
    vocab_size: int, interp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's value for every candidate, and its floor for every other token, when the candidates
    another weighted expert listed get a better guess than the floor.

    A token that expert j (weight > 0) ranks in its top-k but expert i does not list is a likely token, not a
    typical unlisted one: i's value for it is interpolated in log space between i's floor and i's k-th
    logprob, floor + interp·(lp_k - floor) (capped so those guesses take at most half of i's left-over mass).
    The rest of i's left-over mass is spread evenly over the tokens left, so each expert stays a proper
    distribution. Candidates listed only by weight-0 experts are ordinary unlisted tokens, so weights (1, 0)
    still reproduce the first expert exactly. -> values [B, S, C], floor [B, S]."""
    k = ids.shape[-1]
    floor = expert_floor(logprobs, vocab_size)                                    # [B, S]
    match = cand[:, None, :, None] == ids[:, :, None, :]                          # [B, S, C, K]
    listed = match.any(-1)                                                        # [B, S, C]
    own = (match * logprobs[:, :, None, :]).sum(-1)                               # [B, S, C]
    if interp <= 0:
        return torch.where(listed, own, floor[:, :, None]), floor
    active = weights > 0                                                          # [B, S]
    by_active = (listed & active[:, :, None]).any(1, keepdim=True)                # [B, 1, C]
    raised = by_active & ~listed & first[:, None, :]                              # [B, S, C] distinct
    n_raised = raised.sum(-1).to(logprobs.dtype)                                  # [B, S]
    leftover = (1.0 - logprobs.exp().sum(-1)).clamp_min(MIN_LEFTOVER)            # [B, S]
    guess = floor + interp * (logprobs[..., -1] - floor).clamp_min(0.0)           # [B, S]
    guess = torch.minimum(guess, (0.5 * leftover / n_raised.clamp_min(1)).log())
    rest = (leftover - n_raised * guess.exp()).clamp_min(MIN_LEFTOVER)
    new_floor = rest.log() - (vocab_size - k - n_raised).clamp_min(1).log()      # [B, S]
    values = torch.where(listed, own, torch.where(by_active & ~listed, guess[:, :, None], new_floor[:, :, None]))
    return values, new_floor


def mix(
    ids: torch.Tensor, logprobs: torch.Tensor, weights: torch.Tensor, vocab_size: int, space: MixSpace = "logits",
    *, interp: float | None = None,
) -> Mixed:
    """Mix S experts' top-k. ids [B, S, K] long, logprobs [B, S, K] (descending), weights [B, S] summing to 1.
    `interp`: the guess for a token another expert listed (cross_listed_values); default CROSS_LISTED_INTERP."""
    b, s, k = ids.shape
    cand = ids.reshape(b, s * k)                                      # [B, C]
    first = first_occurrence(cand)                                    # [B, C]
    values, floor = cross_listed_values(cand, first, ids, logprobs, weights, vocab_size,
                                        CROSS_LISTED_INTERP if interp is None else interp)
    score = combine(values, weights, space)                          # [B, C]
    tail = combine(floor[:, :, None], weights, space)[:, 0]          # [B]
    score = score.masked_fill(~first, float("-inf"))
    n_tail = (vocab_size - first.sum(-1)).clamp_min(0).to(score.dtype)  # [B] tokens outside the union
    tail_mass = torch.where(n_tail > 0, tail + n_tail.clamp_min(1).log(), torch.full_like(tail, float("-inf")))
    log_z = torch.logsumexp(torch.cat([score, tail_mass[:, None]], dim=1), dim=1)  # [B]
    return Mixed(cand, score - log_z[:, None], first, tail - log_z)


def logprob_of(mixed: Mixed, token: torch.Tensor) -> torch.Tensor:
    """log p_mix of one token per row. token [B] long -> [B]."""
    hit = (mixed.cand_ids == token[:, None]) & mixed.first            # [B, C]
    listed = hit.any(-1)
    value = torch.where(hit, mixed.cand_logprobs, torch.zeros_like(mixed.cand_logprobs)).sum(-1)
    return torch.where(listed, value, mixed.tail_logprob)


def gate_weights(gate_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's rule: top-k of the gate logits, softmax over the selected ones.

    gate_logits [B, E] -> (experts [B, k] long, weights [B, k]); experts sorted by descending gate logit.
    """
    if not 1 <= k <= gate_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {gate_logits.shape[-1]}], got {k}")
    top, experts = gate_logits.topk(k, dim=-1)
    return experts, torch.softmax(top, dim=-1)
