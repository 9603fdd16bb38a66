"""The gate as the serving path uses it: per-sequence incremental state, one GRU step per new token.

`prefill` reads a prompt once; `step` advances many sequences by one token each in one batched GRU step.
Shape legend: B = sequences, E = experts, H = gate hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gating.checkpoint import GateCheckpoint
from gating.mix import gate_weights
from gating.model import Gate


@dataclass
class GateState:
    hidden: torch.Tensor | None = None   # [1, 1, H]
    logits: torch.Tensor | None = None   # [E] routing scores for the next token
    fed: int = 0                         # tokens consumed so far


class GateRuntime:
    """Wraps one immutable gate version; the engine swaps whole runtimes, never mutates one."""

    def __init__(self, gate: Gate, version: str, expert_names: list[str], top_k: int, mix_space: str) -> None:
        # Per-token gate/mix ops are tiny; OpenMP threads only add barrier spinning next to vLLM engines.
        torch.set_num_threads(1)
        self.gate = gate.eval()
        self.version = version
        self.expert_names = list(expert_names)
        self.top_k = top_k
        self.mix_space = mix_space

    @classmethod
    def from_checkpoint(cls, ckpt: GateCheckpoint, top_k: int | None = None, mix_space: str | None = None):
        return cls(ckpt.build(), ckpt.version, ckpt.expert_names, top_k or ckpt.top_k, mix_space or ckpt.mix_space)

    @torch.inference_mode()
    def feed(self, state: GateState, tokens: list[int]) -> GateState:
        """Consume new context tokens; the returned state routes the token after them."""
        if not tokens:
            return state
        x = torch.tensor([tokens], dtype=torch.long)                   # [1, T]
        logits, hidden = self.gate(x, state.hidden)                   # [1, T, E], [1, 1, H]
        return GateState(hidden, logits[0, -1], state.fed + len(tokens))

    def prefill(self, tokens: list[int]) -> GateState:
        return self.feed(GateState(), tokens)

    @torch.inference_mode()
    def step(self, states: list[GateState], tokens: list[int]) -> list[GateState]:
        """One new token for each of B sequences, in one GRU step."""
        hidden = torch.cat([s.hidden for s in states], dim=1)           # [1, B, H]
        x = torch.tensor(tokens, dtype=torch.long)[:, None]             # [B, 1]
        logits, hidden = self.gate(x, hidden)                          # [B, 1, E], [1, B, H]
        return [GateState(hidden[:, i:i + 1].clone(), logits[i, 0], s.fed + 1) for i, s in enumerate(states)]

    @torch.inference_mode()
    def sequence_logits(self, tokens: list[int]) -> torch.Tensor:
        """Teacher-forced routing scores for a whole sequence: [T, E], row t routes token t+1."""
        logits, _ = self.gate(torch.tensor([tokens], dtype=torch.long))
        return logits[0]

    def choose(self, state: GateState, k: int | None = None) -> tuple[list[int], list[float], float]:
        """-> (expert indices, weights, entropy of the full gate softmax in nats)."""
        assert state.logits is not None, "gate has seen no context"
        experts, weights = gate_weights(state.logits[None], k or self.top_k)
        p = torch.softmax(state.logits, -1)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum())
        return experts[0].tolist(), weights[0].tolist(), entropy
