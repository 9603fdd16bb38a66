"""The gate as the serving path uses it: per-sequence incremental state, one GRU step per new token.

`prefill` reads a prompt once; `step` advances many sequences by one token each in one batched GRU step.
An observed-features gate also reads, at each step, what the experts that produced the token said about it
(gating.features, the same function its training used); a prompt carries no such observations.
Shape legend: B = sequences, E = experts, H = gate hidden size, K = top-k, N = scored positions.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from experts.protocol import TopK
from gating.adaptive import adaptive_k, selection_mask
from gating.checkpoint import GateCheckpoint
from gating.features import Memory, signals, step_features, unobserved_features
from gating.model import Gate
from gating.rollout import padded_signals, rollout, top_k_rule


@dataclass
class GateState:
    hidden: torch.Tensor | None = None   # [1, 1, H]
    logits: torch.Tensor | None = None   # [E] routing scores for the next token
    fed: int = 0                         # tokens consumed so far
    memory: Memory | None = None         # observed-features gates: per-expert feature memory, rows [1, E]


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
        feats, memory = None, None
        if self.gate.uses_observations:                                # a prompt: no expert was stepped on it
            feats, memory = unobserved_features(state.memory or Memory.initial(1, len(self.expert_names)), len(tokens))
        logits, hidden = self.gate(x, state.hidden, feats)            # [1, T, E], [1, 1, H]
        return GateState(hidden, logits[0, -1], state.fed + len(tokens), memory)

    def prefill(self, tokens: list[int]) -> GateState:
        return self.feed(GateState(), tokens)

    @torch.inference_mode()
    def step(self, states: list[GateState], tokens: list[int],
             observed: list[dict[int, TopK]] | None = None) -> list[GateState]:
        """One new token for each of B sequences, in one GRU step.

        `observed[b]` is what the experts that produced row b's token said (expert index -> its top-k at
        that position): signals a gate may use for free, since those experts were called anyway. The GRU
        gate reads only token ids and ignores it."""
        hidden = torch.cat([s.hidden for s in states], dim=1)[0]        # [B, H]
        x = torch.tensor(tokens, dtype=torch.long)                      # [B]
        if not self.gate.uses_observations:
            logits, hidden = self.gate.step(x, hidden)                 # [B, E], [B, H]
            return [GateState(h, lg, s.fed + 1) for h, lg, s in zip(hidden[None].split(1, 1), logits.unbind(0), states)]
        e = len(self.expert_names)
        memory = Memory.cat([s.memory or Memory.initial(1, e) for s in states])
        mask, ids, lps = self._observed_tensors(observed or [{} for _ in states], e)
        sig = signals(ids, lps, x, self.gate.args.vocab_size)
        feats, memory = step_features(memory, mask, sig)               # [B, E*F]
        logits, hidden = self.gate.step(x, hidden, feats)              # [B, E], [B, H]
        # Per-sequence states are views into this round's tensors (a few KB): one split per tensor, not one
        # indexing op per row and tensor.
        memories = [Memory(*m) for m in zip(*(t.split(1) for t in memory))]
        return [GateState(h, lg, s.fed + 1, m)
                for h, lg, s, m in zip(hidden[None].split(1, 1), logits.unbind(0), states, memories)]

    @staticmethod
    def _observed_tensors(observed: list[dict[int, TopK]], e: int):
        """-> mask [B, E] bool, ids [B, E, K] (-1 padded), lps [B, E, K] (very negative padded). Filled in flat
        arrays: torch.tensor on nested lists costs ~0.35 µs per element, 1.8 ms for 32 rows of 4 × 20."""
        b = len(observed)
        k = max((len(t.token_ids) for row in observed for t in row.values()), default=1)
        mask = bytearray(b * e)
        ids = array("q", [-1]) * (b * e * k)
        lps = array("f", [-1e4]) * (b * e * k)
        for r, row in enumerate(observed):
            for j, topk in row.items():
                n, at = len(topk.token_ids), (r * e + j) * k
                mask[r * e + j] = 1
                ids[at:at + n] = array("q", topk.token_ids)
                lps[at:at + n] = array("f", topk.logprobs)
        return (torch.frombuffer(mask, dtype=torch.bool).view(b, e),
                torch.frombuffer(ids, dtype=torch.long).view(b, e, k),
                torch.frombuffer(lps, dtype=torch.float32).view(b, e, k))

    @torch.inference_mode()
    def sequence_logits(self, tokens: list[int], all_ids: torch.Tensor | None = None,
                        all_lps: torch.Tensor | None = None, k: int | None = None,
                        threshold: float | None = None) -> torch.Tensor:
        """Teacher-forced routing scores for a whole sequence: [T, E], row t routes token t+1.

        An observed-features gate also needs every expert's top-k at each scored position (all_ids/all_lps
        [N, E, K], N = T - 1, as echo scoring has them) and is rolled out with top-k selection (k default:
        the runtime's top_k), or with the adaptive rule when `threshold` is given (then route row t to
        gating.adaptive.adaptive_k(logits, threshold)[t] experts), reading only the selected experts' scores,
        exactly as `ensemble eval` does."""
        x = torch.tensor([tokens], dtype=torch.long)
        if not self.gate.uses_observations:
            return self.gate(x)[0][0]
        if all_ids is None or all_lps is None:
            raise ValueError(f"gate {self.version} reads the selected experts' scores: pass all_ids/all_lps")
        n = all_ids.shape[0]
        sig = signals(all_ids, all_lps, x[0, 1:n + 1], self.gate.args.vocab_size)       # [N, E]
        if threshold is not None:
            def select(logits: torch.Tensor) -> torch.Tensor:
                return selection_mask(logits, adaptive_k(logits, threshold))
        else:
            select = top_k_rule(k or self.top_k)
        return rollout(self.gate, x, padded_signals(sig, [n]), select)[0]
