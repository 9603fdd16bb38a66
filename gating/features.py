"""Signals the gate gets for free: what the experts it selected said about the token that was then produced.

One pure function computes them for training, evaluation and serving alike (`signals` + `step_features`).
Only the experts selected for a position are ever read (the gate stays sparse: an unselected expert is never
called to feed it); for the others the features say "not observed" and how long they have been skipped.

Per expert e, after token x_t was produced by a mix that included e (row t-1 of the scores):
    observed  1 if e was selected for x_t, else 0
    logprob   log p_e(x_t), top-k value or floor (scaled by 1/10), 0 if not observed
    listed    1 if x_t was in e's top-k, 0 if not (or not observed)
    mass      e's top-k probability mass (its confidence), 0 if not observed
    ema       running mean of e's logprob over the positions it was observed (1/10 scale; 0 before any)
    skipped   log(1 + positions since e was last observed) / 4
    seen      1 once e has been observed at all

Shape legend: B = rows (sequences), E = experts, K = top-k, F = features per expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gating.mix import expert_floor

FEATURES_PER_EXPERT = 7
EMA_DECAY = 0.8          # weight of the past in the running mean of an expert's logprob
LP_SCALE = 10.0


class Signals(NamedTuple):
    """What each expert's top-k says about one realised token (valid only where the expert was selected)."""
    logprob: torch.Tensor   # [B, E]
    listed: torch.Tensor    # [B, E] bool
    mass: torch.Tensor      # [B, E]


class Memory(NamedTuple):
    """Per-row feature memory carried from token to token (part of the gate's state)."""
    ema: torch.Tensor       # [B, E]
    skipped: torch.Tensor   # [B, E] positions since last observed
    seen: torch.Tensor      # [B, E] float 0/1

    @staticmethod
    def initial(b: int, e: int) -> Memory:
        return Memory(torch.zeros(b, e), torch.zeros(b, e), torch.zeros(b, e))

    @staticmethod
    def cat(parts: list[Memory]) -> Memory:
        return Memory(*(torch.cat(xs) for xs in zip(*parts)))


def signals(ids: torch.Tensor, lps: torch.Tensor, token: torch.Tensor, vocab_size: int) -> Signals:
    """ids/lps [B, E, K] top-k of each expert at the position that produced `token` [B] -> Signals [B, E].

    Rows/experts that were not selected may hold anything (e.g. zeros); the observed mask removes them."""
    match = ids == token[:, None, None]                                    # [B, E, K]
    listed = match.any(-1)
    value = (match * lps).sum(-1)
    logprob = torch.where(listed, value, expert_floor(lps, vocab_size))
    return Signals(logprob, listed, lps.exp().sum(-1).clamp(max=1.0))


def step_features(memory: Memory, observed: torch.Tensor, sig: Signals | None) -> tuple[torch.Tensor, Memory]:
    """observed [B, E] bool (which experts produced this token), sig its Signals (None: nothing observed,
    e.g. a prompt token) -> (features [B, E*F], next memory)."""
    obs = observed.float()
    if sig is None:
        lp = listed = mass = torch.zeros_like(obs)
    else:
        lp = torch.where(observed, sig.logprob / LP_SCALE, 0.0)
        listed = (sig.listed & observed).float()
        mass = torch.where(observed, sig.mass, 0.0)
    first = obs * (1 - memory.seen)
    ema = torch.where(observed, EMA_DECAY * memory.ema + (1 - EMA_DECAY) * lp, memory.ema)
    ema = torch.where(first.bool(), lp, ema)                              # the first observation starts the mean
    skipped = torch.where(observed, torch.zeros_like(memory.skipped), memory.skipped + 1)
    seen = torch.maximum(memory.seen, obs)
    feats = torch.stack([obs, lp, listed, mass, ema, torch.log1p(skipped) / 4, seen], -1)   # [B, E, F]
    return feats.flatten(1), Memory(ema, skipped, seen)


def unobserved_features(memory: Memory, n: int) -> tuple[torch.Tensor, Memory]:
    """Features of n consecutive tokens no expert was stepped on (a prompt), in one go -> ([B, n, E*F], memory).

    Equal to n calls of step_features(memory, nothing observed, None)."""
    b, e = memory.ema.shape
    skipped = memory.skipped[:, None, :] + torch.arange(1, n + 1, dtype=memory.skipped.dtype)[None, :, None]  # [B, n, E]
    zeros = torch.zeros(b, n, e)
    feats = torch.stack([zeros, zeros, zeros, zeros, memory.ema[:, None].expand(b, n, e), torch.log1p(skipped) / 4,
                         memory.seen[:, None].expand(b, n, e)], -1)                                           # [B, n, E, F]
    return feats.flatten(2), Memory(memory.ema, memory.skipped + n, memory.seen)
