"""The gate: a small causal network that scores every expert from the context, one GRU step per token.

It never calls an expert. A GRU over token embeddings carries a running summary of the whole context, so
each new token costs one GRU cell step (O(1)) while serving; training runs the same module over sequences.
With `features="observed"` each step also reads gating.features: what the experts selected for the previous
token said about it (free: they were called anyway), and how long each other expert has been skipped.

Shape legend: B = sequences, T = tokens, D = embedding, H = hidden, E = experts, F = feature width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from gating.features import FEATURES_PER_EXPERT

GATE_FEATURES = ("tokens", "observed")


@dataclass(frozen=True)
class GateArgs:
    vocab_size: int
    n_experts: int
    embed_dim: int = 32
    hidden_dim: int = 64
    dropout: float = 0.1
    features: str = "tokens"        # "tokens": token ids only; "observed": plus gating.features per step

    def __post_init__(self) -> None:
        assert self.vocab_size > 0, "vocab_size must be positive"
        assert self.n_experts >= 1, "a gate needs at least one expert"
        assert self.embed_dim > 0 and self.hidden_dim > 0, "gate sizes must be positive"
        assert 0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"
        assert self.features in GATE_FEATURES, f"features must be one of {GATE_FEATURES}"

    @property
    def feature_dim(self) -> int:
        return self.n_experts * FEATURES_PER_EXPERT if self.features == "observed" else 0

    def to_dict(self) -> dict:
        return asdict(self)


class Gate(nn.Module):
    def __init__(self, args: GateArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.embed_dim)
        self.rnn = nn.GRU(args.embed_dim + args.feature_dim, args.hidden_dim, batch_first=True)
        self.drop = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden_dim, args.n_experts)

    @property
    def uses_observations(self) -> bool:
        return self.args.features == "observed"

    def forward(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] long, state [1, B, H] | None, features [B, T, F] (observed gates) ->
        (expert logits [B, T, E], new state [1, B, H]).

        logits[:, t] route the prediction of token t+1 (they have seen tokens 0..t).
        """
        h, state = self.rnn(self._inputs(tokens, features), state)    # [B, T, H]
        return self.head(self.drop(h)), state

    def states(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] long, features [B, T, F] (observed gates) -> the GRU state after each position, from a
        zero state: [B, T, H] (one layer, so its outputs are its states). Right-padded rows of different lengths
        can share a pass: position t never sees the positions after it."""
        h, _ = self.rnn(self._inputs(tokens, features))
        return h

    def _inputs(self, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """tokens [...] long, features [..., F] -> GRU inputs [..., D (+ F for observed gates)]."""
        x = self.embed(tokens)
        if self.uses_observations:
            assert features is not None, "an observed-features gate needs its features (gating.rollout)"
            x = torch.cat([x, features], -1)
        return x

    def step(self, tokens: torch.Tensor, state: torch.Tensor | None = None,
             features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per sequence: tokens [B] long, state [B, H] | None, features [B, F] (observed gates) ->
        (expert logits [B, E], new state [B, H]). The same numbers as `forward` over one position (the same
        GRU cell, measured bit-identical), without nn.GRU's per-call overhead (63 against 145 µs at B = 16):
        serving and the step-by-step rollout of training call it once per token."""
        x = self._inputs(tokens, features)                             # [B, D + F]
        if state is None:
            state = x.new_zeros(x.shape[0], self.args.hidden_dim)
        rnn = self.rnn
        h = torch.gru_cell(x, state, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        return self.head(self.drop(h)), h
