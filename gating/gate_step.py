"""The gate's per-token step as a decode round runs it: one GRU step for B rows at once, compiled.

Why: training, `ensemble eval` and prompts run the torch module (gating.model.Gate over gating.features).
A decode round steps B rows by one token each, where that is ~55 torch ops on [B, E] and [B, H] tensors whose
dispatch costs more than their arithmetic: 0.56-0.84 ms for 32 rows and 0.32 ms for one on an idle core, and
inside the busy gateway 77 µs per generated token at concurrency 32 and 1.1 ms at concurrency 1, the largest
part of the gateway's own per-token work. As ~35 numpy ops (about a microsecond each at these sizes) it took
101 µs for 32 rows of the demo's observed-features gate on an idle core (57 µs now): the expert features and
their memory are one numba kernel (gating/jit.py), the GRU cell stays numpy (`gru_cell`), three matrix products
on weights transposed once and its element-wise gates. The products used to be torch's
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
from gating.jit import kernel, on_warm_up
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


def observed_features(ids: np.ndarray, lps: np.ndarray, tokens: np.ndarray, vocab_size: int, ema: np.ndarray,
                      skipped: np.ndarray, seen: np.ndarray, observed: np.ndarray):
    """gating.features.signals then step_features: ids/lps [B, E, K] (padding: id -1, logprob -1e4), tokens [B],
    memory rows ema / skipped / seen [B, E], observed [B, E] bool -> (features [B, E*F], ema', skipped', seen')."""
    b, e = observed.shape
    cells = np.flatnonzero(observed)
    x = np.empty((b, e * N_FEATURES), dtype=np.float32)
    memory = np.concatenate([ema, skipped, seen], 1).astype(np.float32)
    _write_features(cells, ids.reshape(b * e, -1)[cells], lps.reshape(b * e, -1)[cells], tokens, e, vocab_size,
                    memory, 0, x, 0, memory)
    return x, memory[:, :e], memory[:, e:2 * e], memory[:, 2 * e:]


def step(w: StepWeights, tokens: np.ndarray, packed: np.ndarray, cells: np.ndarray | None = None,
         ids: np.ndarray | None = None, lps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One new token per row: tokens [B] int64, packed [B, W] float32 (see the module docstring), and for an
    observed-features gate the M top-k the experts answered, flat: cells [M] (row·E + expert, each at most once)
    with ids/lps [M, K] (padding: id -1, logprob -1e4); a (row, expert) not among cells was not observed
    -> (routing logits [B, E], packed' [B, W]).

    1) the GRU input: the token's embedding, then (observed gates) the expert features, one kernel that also
       writes the new feature memory into packed'; 2) the GRU cell (numpy) into packed'; 3) the routing logits."""
    n_h, e, d = w.hidden, w.n_experts, w.embed.shape[1]
    b = len(tokens)
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    packed = np.ascontiguousarray(packed, dtype=np.float32)
    out = np.empty((b, w.width), dtype=np.float32)
    # 1) input
    if w.observed:
        x = np.empty((b, d + e * N_FEATURES), dtype=np.float32)
        x[:, :d] = w.embed[tokens]
        _write_features(cells, ids, lps, tokens, e, w.vocab_size, packed, n_h, x, d, out)
    else:
        x = w.embed[tokens]                                                # [B, D]
    # 2) the GRU cell
    out[:, :n_h] = gru_cell(x, np.ascontiguousarray(packed[:, :n_h]), w)
    # 3) routing logits; dropout is off when serving
    logits = out[:, :n_h] @ w.head_t + w.head_b                            # [B, E]
    return logits, out


N_FEATURES = 7        # per expert: observed, logprob, listed, mass, ema, log1p(skipped) / 4, seen (gating.features)


def _write_features(cells, ids, lps, tokens, e: int, vocab_size: int, memory_in, at: int, x, x_at: int,
                    memory_out) -> None:
    """`_features` on arrays of the kernel's types; each observed top-k's listed probability mass comes from one
    numpy exp over [M, K] (vectorised, where the kernel would call exp per value)."""
    lps = np.ascontiguousarray(lps, dtype=np.float32)
    _features(np.ascontiguousarray(cells, dtype=np.int64), np.ascontiguousarray(ids, dtype=np.int64), lps,
              np.exp(lps).sum(-1, dtype=np.float32), np.ascontiguousarray(tokens, dtype=np.int64), e, memory_in, at,
              math.log(max(vocab_size - lps.shape[-1], 1)), x, x_at, memory_out)


@kernel
def _features(cells, ids, lps, masses, tokens, e, memory_in, at, log_unlisted, x, x_at, memory_out):  # pragma: no cover
    """Per row and expert: the signals of the realised token in that expert's top-k when it was observed (its
    logprob, or the expert's floor when unlisted; listed; the listed mass), then the features and the memory update
    of gating.features.step_features, all in float32. Top-k m belongs to row cells[m] // e, expert cells[m] % e.
    Memory rows are read from memory_in[:, at:] and written to memory_out[:, at:] (ema [E], skipped [E], seen
    [E]); features go to x[:, x_at:], F per expert."""
    b, k = tokens.shape[0], ids.shape[1]
    one, zero = np.float32(1.0), np.float32(0.0)
    decay, fresh = np.float32(EMA_DECAY), np.float32(1 - EMA_DECAY)
    scale, min_left = np.float32(LP_SCALE), np.float32(MIN_LEFTOVER)
    unlisted = np.float32(log_unlisted)
    slot = np.full(b * e, -1, np.int64)                     # (row, expert) -> its top-k, or -1: not observed
    for m in range(cells.shape[0]):
        slot[cells[m]] = m
    for r in range(b):
        for j in range(e):
            m = slot[r * e + j]
            obs = m >= 0
            # signals
            listed, value, lp = False, zero, zero
            mass = masses[m] if obs else zero
            if obs:
                for i in range(k):
                    if ids[m, i] == tokens[r]:
                        listed = True
                        value += lps[m, i]
                floor = np.log(max(one - mass, min_left)) - unlisted
                lp = (value if listed else floor) / scale
            # features and memory
            ema, skipped, seen = memory_in[r, at + j], memory_in[r, at + e + j], memory_in[r, at + 2 * e + j]
            if obs:
                ema = lp if seen != one else decay * ema + fresh * lp        # first seen: its own value
                skipped = zero
            else:
                skipped = skipped + one
            seen = max(seen, one if obs else zero)
            f = x_at + j * N_FEATURES
            x[r, f] = one if obs else zero
            x[r, f + 1] = lp
            x[r, f + 2] = one if listed else zero
            x[r, f + 3] = min(mass, one)
            x[r, f + 4] = ema
            x[r, f + 5] = np.log1p(skipped) / np.float32(4.0)
            x[r, f + 6] = seen
            memory_out[r, at + j], memory_out[r, at + e + j], memory_out[r, at + 2 * e + j] = ema, skipped, seen


def gru_cell(x: np.ndarray, h: np.ndarray, w: StepWeights) -> np.ndarray:
    """torch.gru_cell: x [B, In], h [B, H] -> h' [B, H]. Gates in PyTorch's order (reset, update, new). In numpy, not
    a kernel: its 2·B·H exps and B·H tanhs are vectorised there, scalar calls in a compiled loop (60 against 25 µs
    for 32 rows)."""
    gi = x @ w.w_ih_t + w.b_ih                                             # [B, 3H]
    gh = h @ w.w_hh_t + w.b_hh
    n_h = w.hidden
    r = _sigmoid(gi[:, :n_h] + gh[:, :n_h])
    z = _sigmoid(gi[:, n_h:2 * n_h] + gh[:, n_h:2 * n_h])
    n = np.tanh(gi[:, 2 * n_h:] + r * gh[:, 2 * n_h:])
    return n + z * (h - n)                                                 # = (1 - z)·n + z·h


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


@on_warm_up
def _warm_up() -> None:
    e, h, d = 2, 4, 4
    for observed in (False, True):
        width_in = d + (e * N_FEATURES if observed else 0)
        w = StepWeights(np.zeros((8, d), np.float32), np.zeros((width_in, 3 * h), np.float32),
                        np.zeros((h, 3 * h), np.float32), np.zeros(3 * h, np.float32), np.zeros(3 * h, np.float32),
                        np.zeros((h, e), np.float32), np.zeros(e, np.float32), 8, e, h, observed)
        # ids as the serving path has them: read-only, straight from the answers' bytes (all of one K), or
        # writable (padded to the longest K); numba compiles the two apart
        ids = np.ones((e, 2), dtype=np.int64)
        for block in (np.frombuffer(ids.tobytes(), np.int64).reshape(e, 2), ids):
            step(w, np.array([1]), np.zeros((1, w.width), dtype=np.float32), np.arange(e), block,
                 np.full((e, 2), -1.0, dtype=np.float64))
