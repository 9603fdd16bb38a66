"""The decode engine: an async generator that produces one token per step from the gated mix of experts.

It speaks token ids only (text lives in orchestrator/stream.py). Per token: route -> step -> mix ->
sample -> feed back. Steps of concurrent sequences for the same expert share one round trip (batcher).

Shape legend: S = selected experts, K = top-k per expert, C = S*K candidates.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from experts.protocol import Expert, ExpertInfo, SessionStep, StepOutput, TopK
from gating.mix import MIX_SPACES, Mixed, gate_weights, logprob_of, mix
from gating.objective import select_experts
from gating.runtime import GateRuntime, GateState
from gating.scores import stack_scores
from orchestrator.batcher import StepBatcher
from orchestrator.sample import make_rng, sample_token, top_alternatives
from orchestrator.types import GateDecision, GenerationRequest, TokenEvent

ENSEMBLE = "ensemble"


@dataclass
class _Sequence:
    """One request's decoding state: its tokens and how far each expert's session has caught up."""

    request_id: str
    tokens: list[int]
    synced: dict[int, int] = field(default_factory=dict)     # expert index -> tokens its session holds
    session: str = field(default_factory=lambda: uuid.uuid4().hex)


class EnsembleEngine:
    def __init__(
        self, experts: dict[str, Expert], gate: GateRuntime | None, *,
        top_k: int = 2, mix_space: str = "logits", logprobs_k: int = 20,
    ) -> None:
        if not experts:
            raise ValueError("the engine needs at least one expert")
        if mix_space not in MIX_SPACES:
            raise ValueError(f"mix_space must be one of {MIX_SPACES}, got {mix_space!r}")
        self.expert_names = list(experts)
        self._experts = [experts[n] for n in self.expert_names]
        if not 1 <= top_k <= len(self._experts):
            raise ValueError(f"top_k must be in [1, {len(self._experts)}], got {top_k}")
        self.top_k, self.mix_space, self.logprobs_k = top_k, mix_space, logprobs_k
        self._batchers = [StepBatcher(n, e, logprobs_k) for n, e in zip(self.expert_names, self._experts)]
        self._gate: GateRuntime | None = None
        self.infos: list[ExpertInfo] = []
        if gate is not None:
            self.set_gate(gate)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch every expert's info and insist that they share one tokenizer."""
        from experts.tokenizer_check import check_shared_tokenizer

        self.infos = list(await asyncio.gather(*(e.info() for e in self._experts)))
        check_shared_tokenizer(self.infos)
        for b in self._batchers:
            b.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self._batchers))

    def set_gate(self, gate: GateRuntime) -> None:
        """Swap the live gate. Running requests keep the runtime they started with."""
        if gate.expert_names != self.expert_names:
            raise ValueError(f"gate {gate.version} routes {gate.expert_names}, engine serves {self.expert_names}")
        self._gate = gate

    @property
    def gate_version(self) -> str:
        return self._gate.version if self._gate is not None else "none"

    @property
    def vocab_size(self) -> int:
        return self.infos[0].vocab_size

    @property
    def max_model_len(self) -> int:
        return min(i.max_model_len for i in self.infos)

    @property
    def eos_token_id(self) -> int | None:
        return self.infos[0].eos_token_id

    @property
    def models(self) -> list[str]:
        return [ENSEMBLE, *self.expert_names]

    # ---- generation ------------------------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        """Raise ValueError (user-facing message) for anything the experts would choke on."""
        if req.model not in self.models:
            raise ValueError(f"unknown model {req.model!r}; available: {', '.join(self.models)}")
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        room = self.max_model_len - len(req.prompt_ids)
        if room < 0 or req.params.max_tokens > room:
            raise ValueError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) exceeds "
                f"the context length {self.max_model_len}"
            )

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield one TokenEvent per generated token; the last carries finish_reason."""
        self.validate(req)
        params, gate = req.params, self._gate            # pin the gate version for this request
        space = self._space(req.model, gate)
        seq = _Sequence(req.request_id, list(req.prompt_ids))
        rng = make_rng(params.seed)
        gate_state = gate.feed(GateState(), seq.tokens) if gate is not None and req.model == ENSEMBLE else None
        try:
            for index in range(params.max_tokens):
                # 1) route: which experts produce this token, with what weights
                experts, weights, entropy = self._route(req.model, gate, gate_state)
                # 2) step the chosen experts at once; an expert skipped earlier catches up in the same call
                outs = await asyncio.gather(*(self._sync(seq, e) for e in experts))
                # 3) mix their top-k into one distribution over the candidate union
                mixed = self._mix(outs, weights, space)                   # rows: 1, C candidates
                # 4) sample
                token = sample_token(mixed.cand_ids[0], mixed.cand_logprobs[0], params.temperature, params.top_p, rng)
                logprob = float(logprob_of(mixed, torch.tensor([token]))[0])
                # 5) feed the token back: to the sequence now, to the experts on their next step
                seq.tokens.append(token)
                if gate_state is not None:
                    gate_state = gate.feed(gate_state, [token])
                finish = self._finish_reason(token, index, params, len(seq.tokens))
                yield TokenEvent(
                    req.request_id, index, token, logprob,
                    GateDecision(tuple(self.expert_names[e] for e in experts), tuple(weights), entropy),
                    top_alternatives(mixed, 0, params.top_logprobs), finish,
                )
                if finish:
                    return
        finally:
            for e in seq.synced:
                self._batchers[e].close(seq.session)

    def _route(self, model: str, gate: GateRuntime | None, state: GateState | None):
        if model != ENSEMBLE:
            return [self.expert_names.index(model)], [1.0], 0.0
        if gate is None:                                   # no trained gate yet: uniform over all experts
            n = len(self._experts)
            return list(range(n)), [1.0 / n] * n, math.log(n)
        return gate.choose(state, self.top_k)

    async def _sync(self, seq: _Sequence, e: int) -> TopK:
        held = seq.synced.get(e)
        step = SessionStep(seq.session, tuple(seq.tokens if held is None else seq.tokens[held:]))
        batcher = self._batchers[e]
        out: StepOutput = await (batcher.open(step) if held is None else batcher.advance(step))
        if out.error is not None or out.topk is None:
            raise RuntimeError(f"expert {self.expert_names[e]}: {out.error}")
        seq.synced[e] = len(seq.tokens)
        return out.topk

    def _space(self, model: str, gate: GateRuntime | None) -> str:
        """The mixing space of a request: its gate's (trained for it, or set by config), else the default."""
        return gate.mix_space if gate is not None and model == ENSEMBLE else self.mix_space

    def _mix(self, outs: list[TopK], weights: list[float], space: str) -> Mixed:
        k = min(len(o.token_ids) for o in outs)
        ids = torch.tensor([[o.token_ids[:k] for o in outs]], dtype=torch.long)        # [1, S, K]
        lps = torch.tensor([[o.logprobs[:k] for o in outs]], dtype=torch.float32)      # [1, S, K]
        return mix(ids, lps, torch.tensor([weights], dtype=torch.float32), self.vocab_size, space)

    def _finish_reason(self, token: int, index: int, params, length: int) -> str | None:
        if token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos):
            return "stop"
        if index + 1 >= params.max_tokens or length >= self.max_model_len:
            return "length"
        return None

    # ---- teacher-forced scoring (echo) -----------------------------------------------------------

    async def score(
        self, request_id: str, token_ids: list[int], model: str, top_logprobs: int = 0
    ) -> list[tuple[float | None, tuple[tuple[int, float], ...]]]:
        """Per token of `token_ids`: its logprob under `model` given the tokens before it (None for the
        first) and the top alternatives. Same routing and mixing code as generation and `ensemble eval`."""
        self.validate(GenerationRequest(request_id, tuple(token_ids), model=model))
        members = list(range(len(self._experts))) if model == ENSEMBLE else [self.expert_names.index(model)]
        outs = await asyncio.gather(*(self._experts[e].score([list(token_ids)], self.logprobs_k) for e in members))
        for e, (out,) in zip(members, outs):
            if out.error:
                raise ValueError(f"expert {self.expert_names[e]}: {out.error}")
        all_ids, all_lps, targets = stack_scores([o[0] for o in outs])             # [N, E', K], [N]
        experts, weights = self._sequence_routing(model, list(token_ids), len(targets))
        ids, lps = select_experts(all_ids, all_lps, experts)                          # [N, S, K]
        mixed = mix(ids, lps, weights, self.vocab_size, self._space(model, self._gate))
        lp = logprob_of(mixed, targets)                                                # [N]
        return [(None, ())] + [
            (float(lp[j]), top_alternatives(mixed, j, top_logprobs)) for j in range(len(targets))
        ]

    def _sequence_routing(self, model: str, tokens: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced routing for n positions -> (experts [N, S] indexing the scored members, weights [N, S])."""
        if model != ENSEMBLE:
            return torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1)
        gate = self._gate
        if gate is None:
            e = len(self._experts)
            return torch.arange(e).expand(n, e), torch.full((n, e), 1.0 / e)
        return gate_weights(gate.sequence_logits(tokens)[:n], self.top_k)
