"""The gate's per-token step as a decode round runs it: one GRU step for B rows at once, in numpy.

Why: training, `ensemble eval` and prompts run the torch module (gating.model.Gate over gating.features).
A decode round steps B rows by one token each, where that is ~55 torch ops on [B, E] and [B, H] tensors whose
dispatch costs more than their arithmetic: 0.56-0.84 ms for 32 rows and 0.32 ms for one on an idle core, and
inside the busy gateway 77 µs per generated token at concurrency 32 and 1.1 ms at concurrency 1, the largest
part of the gateway's own per-token work. Here the same step is ~35 numpy ops (about a microsecond each at
these sizes) plus three matrix products, also in numpy, on weights transposed once. They used to be torch's
`F.linear`, which hands the GIL away on every call: with another Python thread busy in the process, getting it
back took a switch interval each time (three products of one row: 14 µs alone, 16 ms median beside a
spinning thread; numpy's 6 µs, unchanged beside it, as it keeps the GIL for a few rows; /tmp script, this
machine).

The math is gating.features' `signals` and `step_features` and torch's GRU cell, step for step, in float32;
tests/unit/test_gate_step.py checks it against them (routing logits to ~1e-6) and the serving tests in
test_gate_features.py against the training rollout.

A row's state is one float32 vector, `packed`: the GRU hidden state [H], then for an observed-features gate its
feature memory, ema [E], skipped [E], seen [E] (gating.features.Memory). A round stacks its rows' vectors
([B, W], one copy) and hands each row a view of the next round's array.

Shape legend: B = rows, E = experts, K = top-k, H = hidden, D = embedding, F = features per expert,
W = packed width (H, or H + 3E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gating.features import EMA_DECAY, LP_SCALE
from gating.mix import MIN_LEFTOVER
from gating.model import Gate


@dataclass(frozen=True)
class StepWeights:
    """A gate's parameters as the numpy step reads them: float32, the matrices transposed (x @ w_ih_t is F.linear's
    x @ w_ih.T)."""

    embed: np.ndarray          # [V, D]
    w_ih_t: np.ndarray         # [D (+ E*F), 3H]
    w_hh_t: np.ndarray         # [H, 3H]
    b_ih: np.ndarray           # [3H]
    b_hh: np.ndarray           # [3H]
    head_t: np.ndarray         # [H, E]
    head_b: np.ndarray         # [E]
    vocab_size: int
    n_experts: int
    hidden: int
    observed: bool             # an observed-features gate

    @classmethod
    def of(cls, gate: Gate) -> StepWeights:
        rnn, a = gate.rnn, gate.args

        def frozen(t: torch.Tensor) -> np.ndarray:             # one C-ordered copy of its own (a .T included)
            return np.array(t.detach().float().numpy(), dtype=np.float32, order="C")

        return cls(frozen(gate.embed.weight), frozen(rnn.weight_ih_l0.T), frozen(rnn.weight_hh_l0.T),
                   frozen(rnn.bias_ih_l0), frozen(rnn.bias_hh_l0), frozen(gate.head.weight.T), frozen(gate.head.bias),
                   a.vocab_size, a.n_experts, a.hidden_dim, gate.uses_observations)

    @property
    def width(self) -> int:
        return self.hidden + (3 * self.n_experts if self.observed else 0)


def signals(ids: np.ndarray, lps: np.ndarray, token: np.ndarray, vocab_size: int):
    """gating.features.signals in numpy: ids/lps [B, E, K] (padding: id -1, logprob -1e4), token [B] ->
    (logprob, listed, mass), each [B, E]."""
    match = ids == token[:, None, None]                                    # [B, E, K]
    listed = match.any(-1)
    value = (match * lps).sum(-1, dtype=np.float32)
    mass = np.exp(lps).sum(-1, dtype=np.float32)
    leftover = np.maximum(np.float32(1.0) - mass, np.float32(MIN_LEFTOVER))
    floor = np.log(leftover) - np.float32(math.log(max(vocab_size - lps.shape[-1], 1)))
    return np.where(listed, value, floor), listed, np.minimum(mass, np.float32(1.0))


def step_features(ema: np.ndarray, skipped: np.ndarray, seen: np.ndarray, observed: np.ndarray, sig):
    """gating.features.step_features in numpy: memory rows [B, E] each, observed [B, E] bool, sig from
    `signals` -> (features [B, E*F], ema, skipped, seen)."""
    logprob, listed_any, mass_any = sig
    obs = observed.astype(np.float32)
    lp = np.where(observed, logprob / np.float32(LP_SCALE), np.float32(0.0))
    listed = (listed_any & observed).astype(np.float32)
    mass = np.where(observed, mass_any, np.float32(0.0))
    first = (obs * (np.float32(1.0) - seen)).astype(bool)
    ema = np.where(observed, np.float32(EMA_DECAY) * ema + np.float32(1 - EMA_DECAY) * lp, ema)
    ema = np.where(first, lp, ema)
    skipped = np.where(observed, np.float32(0.0), skipped + np.float32(1.0))
    seen = np.maximum(seen, obs)
    feats = np.stack([obs, lp, listed, mass, ema, np.log1p(skipped) / np.float32(4.0), seen], -1)   # [B, E, F]
    return feats.reshape(feats.shape[0], -1), ema, skipped, seen


def gru_cell(x: np.ndarray, h: np.ndarray, w: StepWeights) -> np.ndarray:
    """torch.gru_cell: x [B, In], h [B, H] -> h' [B, H]. Gates in PyTorch's order (reset, update, new)."""
    gi = x @ w.w_ih_t + w.b_ih                                             # [B, 3H]
    gh = h @ w.w_hh_t + w.b_hh
    n_h = w.hidden
    r = _sigmoid(gi[:, :n_h] + gh[:, :n_h])
    z = _sigmoid(gi[:, n_h:2 * n_h] + gh[:, n_h:2 * n_h])
    n = np.tanh(gi[:, 2 * n_h:] + r * gh[:, 2 * n_h:])
    return n + z * (h - n)                                                 # = (1 - z)·n + z·h


def step(w: StepWeights, tokens: np.ndarray, packed: np.ndarray, observed: np.ndarray | None = None,
         ids: np.ndarray | None = None, lps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One new token per row: tokens [B] int64, packed [B, W] float32 (see the module docstring), and for an
    observed-features gate observed [B, E] bool with ids/lps [B, E, K] -> (routing logits [B, E], packed' [B, W])."""
    n_h, e = w.hidden, w.n_experts
    h = packed[:, :n_h]
    x = w.embed[tokens]                                                    # [B, D]
    if w.observed:
        ema, skipped, seen = packed[:, n_h:n_h + e], packed[:, n_h + e:n_h + 2 * e], packed[:, n_h + 2 * e:]
        feats, ema, skipped, seen = step_features(ema, skipped, seen, observed,
                                                  signals(ids, lps, tokens, w.vocab_size))
        x = np.concatenate([x, feats], 1)
    h = gru_cell(np.ascontiguousarray(x), np.ascontiguousarray(h), w)
    logits = h @ w.head_t + w.head_b                                       # [B, E]; dropout is off when serving
    out = np.concatenate([h, ema, skipped, seen], 1) if w.observed else h
    return logits, out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))
