"""Run a gate along whole sequences the way serving runs it, token by token (training, evaluation, echo).

A token-only gate reads the sequence in one GRU call. An observed-features gate cannot: what it reads at
position t depends on which experts it selected at t-1, so it is stepped one position at a time, selecting
with the serving rule (`select`) and observing only the selected experts' scores (gating.features).

Shape legend: B = sequences, T = positions, E = experts, K = top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gating.features import Memory, Signals, step_features
from gating.model import Gate

Select = Callable[[torch.Tensor], torch.Tensor]     # gate logits [B, E] -> selected [B, E] bool


def top_k_rule(k: int) -> Select:
    def select(logits: torch.Tensor) -> torch.Tensor:
        idx = logits.topk(min(k, logits.shape[-1]), -1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)

    return select


def rollout(gate: Gate, tokens: torch.Tensor, sig: Signals | None, select: Select,
            prompt: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [B, T] (row t routes token t+1), sig: per-row Signals [B, T, E] of every expert at every row
    (only the selected ones are ever read), prompt [B]: tokens 1..prompt-1 were prompt tokens, fed to the
    experts without their scores (no observations); row prompt-1 routes the first generated token, whose
    producers are observed, as in serving. Default 0: every row observed -> gate logits [B, T, E]."""
    if not gate.uses_observations:
        return gate(tokens)[0]
    assert sig is not None, "an observed-features gate needs the experts' scores along the sequence"
    # The features carry no gradient (they are what the selected experts said), so they are found in a
    # step-by-step pass without autograd and without dropout (as served), then one GRU call over the whole
    # sequence gives the logits to train: the same logits the steps gave, at the cost of one pass.
    training = gate.training
    gate.eval()
    try:
        with torch.no_grad():
            feats, logits = _step_through(gate, tokens, sig, select, prompt)
    finally:
        gate.train(training)
    if not (training or torch.is_grad_enabled()):
        return logits
    return gate(tokens, None, feats)[0]


def _step_through(gate: Gate, tokens: torch.Tensor, sig: Signals, select: Select, prompt: torch.Tensor | None):
    """-> (features [B, T, F], logits [B, T, E]) stepping the gate one position at a time."""
    b, t = tokens.shape
    e = gate.args.n_experts
    prompt = torch.zeros(b, dtype=torch.long) if prompt is None else prompt
    memory, hidden = Memory.initial(b, e), None
    selected = torch.zeros(b, e, dtype=torch.bool)
    feats_out, logits_out = [], []
    for j in range(t):
        if j == 0:
            feats, memory = step_features(memory, selected, None)
        else:
            observed = selected & (prompt <= j)[:, None]              # row j-1 produced token j
            step_sig = Signals(sig.logprob[:, j - 1], sig.listed[:, j - 1], sig.mass[:, j - 1])
            feats, memory = step_features(memory, observed, step_sig)
        logits, hidden = gate.step(tokens[:, j], hidden, feats)               # [B, E], [B, H]
        feats_out.append(feats)
        logits_out.append(logits)
        selected = select(logits)
    return torch.stack(feats_out, 1), torch.stack(logits_out, 1)


def corpus_signals(ids: torch.Tensor, lps: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> Signals:
    """Signals of every expert for flat corpus rows: ids/lps [N, E, K], targets [N] -> Signals [N, E]."""
    from gating.features import signals

    return signals(ids, lps, targets, vocab_size)


def pad_rows(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Flat rows [N, ...] of consecutive sequences with the given lengths -> [B, T, ...] (zero padded)."""
    t = max(lengths)
    out = values.new_zeros((len(lengths), t, *values.shape[1:]))
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n] = values[start:start + n]
        start += n
    return out


def padded_signals(sig: Signals, lengths: list[int]) -> Signals:
    return Signals(*(pad_rows(x, lengths) for x in sig))
