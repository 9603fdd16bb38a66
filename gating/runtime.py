"""The gate as the serving path uses it: per-sequence incremental state, one GRU step per new token.

`prefill` reads a prompt once (the torch module over the whole prompt); `step` advances many sequences by one
token each in one batched step (gating.gate_step: the same cell and features in numpy, a fraction of torch's
per-op cost at these sizes). An observed-features gate also reads, at each step, what the experts that produced
the token said about it (gating.features, the same functions its training used); a prompt carries no such
observations.
Shape legend: B = sequences, E = experts, H = gate hidden size, K = top-k, N = scored positions, W = packed width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from experts.protocol import TopK, stacked
from gating import gate_step
from gating.adaptive import adaptive_k, selection_mask
from gating.checkpoint import GateCheckpoint
from gating.features import Memory, signals, unobserved_features
from gating.model import Gate
from gating.rollout import padded_signals, rollout, top_k_rule


@dataclass
class GateState:
    """One sequence's gate state after `fed` tokens. `packed` [W] float32: the GRU hidden state, then (observed-
    features gates) the feature memory ema, skipped, seen (gating.gate_step); None before any token."""

    packed: np.ndarray | None = None
    logits: np.ndarray | None = None     # [E] float32 routing scores for the next token
    fed: int = 0                         # tokens consumed so far

    def hidden(self, h: int) -> torch.Tensor | None:
        """The GRU state as the torch module takes it: [1, 1, H] (None before any token)."""
        return None if self.packed is None else torch.from_numpy(self.packed[:h]).view(1, 1, h)

    def memory(self, h: int, e: int) -> Memory | None:
        """The feature memory as gating.features keeps it (rows [1, E]); None before any token or without one."""
        if self.packed is None or self.packed.shape[0] == h:
            return None
        return Memory(*(torch.from_numpy(self.packed[h + i * e:h + (i + 1) * e]).view(1, e) for i in range(3)))


@dataclass(frozen=True)
class Observed:
    """What the experts that produced a step's tokens said about them, flat: tops[m] is expert experts[m]'s top-k at
    the position of row rows[m]'s new token (rows index the step's states; a (row, expert) at most once). The
    decode loop builds it as it walks its rounds' routes; `of` builds it from one {expert: top-k} per row."""

    rows: list[int]
    experts: list[int]
    tops: list[TopK]

    @classmethod
    def of(cls, per_row: Sequence[Mapping[int, TopK]]) -> Observed:
        pairs = [(r, e, t) for r, row in enumerate(per_row) for e, t in row.items()]
        return cls([r for r, _, _ in pairs], [e for _, e, _ in pairs], [t for _, _, t in pairs])


class GateRuntime:
    """Wraps one immutable gate version; the engine swaps whole runtimes, never mutates one."""

    def __init__(self, gate: Gate, version: str, expert_names: list[str], top_k: int, mix_space: str) -> None:
        # Per-token gate/mix ops are tiny; OpenMP threads only add barrier spinning next to vLLM engines.
        torch.set_num_threads(1)
        self.gate = gate.eval()
        self._weights = gate_step.StepWeights.of(self.gate)
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
        h, e = self._weights.hidden, len(self.expert_names)
        x = torch.tensor([tokens], dtype=torch.long)                   # [1, T]
        feats, memory = None, None
        if self.gate.uses_observations:                                # a prompt: no expert was stepped on it
            feats, memory = unobserved_features(state.memory(h, e) or Memory.initial(1, e), len(tokens))
        logits, hidden = self.gate(x, state.hidden(h), feats)         # [1, T, E], [1, 1, H]
        parts = [hidden.reshape(1, h), *(memory or ())]
        packed = torch.cat(parts, 1)[0].numpy().copy()                 # [W]
        return GateState(packed, logits[0, -1].numpy().copy(), state.fed + len(tokens))

    def prefill(self, tokens: list[int]) -> GateState:
        return self.feed(GateState(), tokens)

    @torch.inference_mode()
    def prefill_many(self, prompts: list[list[int]]) -> list[GateState]:
        """`prefill` of several prompts in one pass of the GRU over the longest (right-padded; each row's state is
        read at its own last token). The GRU is a loop over positions, so one pass costs about what one prompt
        costs: ≈ 1.5 ms of CPU per 133-token prompt on the demo gate, which an admission of B prompts spent B
        times, on the event loop, just before the main round's expert calls. Equal to `prefill` of each prompt
        to float32 rounding (batched products)."""
        if len(prompts) < 2 or not all(prompts):
            return [self.prefill(p) for p in prompts]
        e = len(self.expert_names)
        b, lengths = len(prompts), torch.tensor([len(p) for p in prompts])
        x = torch.zeros(b, int(lengths.max()), dtype=torch.long)                       # [B, T]
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        feats = unobserved_features(Memory.initial(b, e), x.shape[1])[0] if self.gate.uses_observations else None
        last = self.gate.states(x, feats)[torch.arange(b), lengths - 1]                 # [B, H]
        logits = self.gate.head(self.gate.drop(last))                                   # [B, E]
        states = []
        for i, n in enumerate(lengths.tolist()):
            parts = [last[i:i + 1]]
            if self.gate.uses_observations:                            # the memory after n unobserved tokens
                parts += list(unobserved_features(Memory.initial(1, e), n)[1])
            states.append(GateState(torch.cat(parts, 1)[0].numpy().copy(), logits[i].numpy().copy(), n))
        return states

    def step(self, states: list[GateState], tokens: list[int], observed: Observed | None = None) -> list[GateState]:
        """One new token for each of B sequences, in one batched step (gating.gate_step).

        `observed` is what the experts that produced the rows' tokens said (each one's top-k at that position):
        signals a gate may use for free, since those experts were called anyway; a row with none was not
        observed. A gate that reads only token ids ignores it. Every state must have been prefilled."""
        w = self._weights
        packed = np.stack([s.packed for s in states])                  # [B, W]
        x = np.array(tokens, dtype=np.int64)                            # [B]
        if w.observed:
            logits, packed = gate_step.step(w, x, packed, *self._observation_arrays(observed, w.n_experts))
        else:
            logits, packed = gate_step.step(w, x, packed)
        # Per-sequence states are row views into this round's arrays (a few hundred bytes each).
        return [GateState(p, lg, s.fed + 1) for p, lg, s in zip(packed, logits, states)]

    @staticmethod
    def _observation_arrays(observed: Observed | None, e: int):
        """-> cells [M] int64 (row·E + expert), ids [M, K] int64 and lps [M, K] (gate_step.step's padding where a
        top-k is shorter). One read of every packed top-k when all have the same K (the usual case: the engines'
        logprobs_k), else row by row."""
        if observed is None or not observed.tops:
            return np.empty(0, np.int64), np.full((0, 1), -1, np.int64), np.full((0, 1), -1e4, np.float32)
        cells = np.asarray(observed.rows, dtype=np.int64) * e + np.asarray(observed.experts, dtype=np.int64)
        block = stacked(observed.tops)
        if block is not None:
            return cells, *block
        k = max(1, *(t.k for t in observed.tops))
        ids = np.full((len(cells), k), -1, dtype=np.int64)
        lps = np.full((len(cells), k), -1e4, dtype=np.float32)
        for m, t in enumerate(observed.tops):
            ids[m, :t.k] = t.id_array
            lps[m, :t.k] = t.lp_array
        return cells, ids, lps

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
