"""The decode engine: for each request an async generator of TokenEvents, one per generated token.

It speaks token ids only (text lives in orchestrator/stream.py). Two paths:
  native    one expert makes every token (model=<expert>): its vLLM engine decodes alone and we relay the
            tokens (orchestrator/native.py), so this costs what vLLM costs plus a thin relay;
  lockstep  the gated ensemble (or a seeded single-expert request on an engine that cannot seed): every
            running sequence of this replica advances one token per round of the decode loop
            (orchestrator/decode_loop.py: route -> step -> mix -> sample -> feed back).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator

from experts.answer_checks import probe_problem, score_problem
from experts.protocol import Expert, ExpertInfo, SessionStep
from gating import jit
from gating.mix import MIX_SPACES, logprob_of, mix
from gating.mix_row import rows_of
from gating.objective import select_experts
from gating.runtime import GateRuntime
from gating.scores import stack_scores
from orchestrator.decode_loop import DecodeLoop
from orchestrator.expert_health import ExpertHealth
from orchestrator.native import native_events
from orchestrator.profile import PhaseClock
from orchestrator.request_checks import Limits, RequestRejected, check_request
from orchestrator.sample import make_rng
from orchestrator.sequence import Sequence
from orchestrator.types import ENSEMBLE, ExpertsUnavailable, GenerationParams, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class EnsembleEngine:
    def __init__(
        self, experts: dict[str, Expert], gate: GateRuntime | None, *,
        top_k: int = 2, mix_space: str = "logits", logprobs_k: int = 20, probe_interval_s: float = 1.0,
        probe_timeout_s: float = 10.0,
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
        self.health = ExpertHealth(self.expert_names, probe_interval_s=probe_interval_s)
        # As long as a step may take before it marks an expert down (the gateway passes its expert timeout): a
        # replica that answers slower than this is down; one that answers within it serves steps, so is up.
        self.probe_timeout_s = probe_timeout_s
        self.clock = PhaseClock()
        self._gate: GateRuntime | None = None
        self._loop: DecodeLoop | None = None
        self._prober: asyncio.Task | None = None
        self._probe_ids = itertools.count()
        self._probe_prefix = uuid.uuid4().hex[:12]
        self.infos: list[ExpertInfo] = []
        if gate is not None:
            self.set_gate(gate)

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch every expert's info and insist that they share one tokenizer."""
        from experts.tokenizer_check import check_shared_tokenizer

        self.infos = list(await asyncio.gather(*(e.info() for e in self._experts)))
        check_shared_tokenizer(self.infos)
        # The round's compiled kernels (gating/jit.py), compiled or loaded from numba's cache before any request.
        took = await asyncio.to_thread(jit.warm_up)
        log.info("decode-round kernels ready in %.2f s", took)
        self._loop = DecodeLoop(self._experts, self.expert_names, vocab_size=self.vocab_size,
                                eos_token_id=self.eos_token_id, max_model_len=self.max_model_len,
                                logprobs_k=self.logprobs_k, health=self.health, clock=self.clock)
        self._loop.start()
        self._prober = asyncio.get_running_loop().create_task(self._probe_down_experts(), name="expert-prober")

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self._loop is not None:
            await self._loop.stop()
        for e in self._experts:
            closer = getattr(e, "aclose", None)
            if closer is not None:
                await closer()

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

    @property
    def active_sequences(self) -> int:
        return self._loop.active if self._loop is not None else 0

    @property
    def migrations(self) -> int:
        return self._loop.migrations if self._loop is not None else 0

    @property
    def unsound_answers(self) -> int:
        return self._loop.unsound_answers if self._loop is not None else 0

    def expert_work(self) -> dict[tuple[str, str], int]:
        """(kind, "rows" | "tokens") -> what the experts were asked to compute so far (DecodeLoop.work)."""
        return dict(self._loop.work) if self._loop is not None else {}

    def sessions_by_replica(self) -> dict[str, dict[str, int]]:
        """expert -> replica id -> decode sessions this gateway holds there (for /metrics)."""
        return {name: e.pinned_replicas() for name, e in zip(self.expert_names, self._experts)
                if hasattr(e, "pinned_replicas")}

    def quarantined_replicas(self) -> dict[str, list[str]]:
        """expert -> its replicas this gateway places no new session on, after unsound answers (for /metrics)."""
        return {name: e.quarantined_replicas() for name, e in zip(self.expert_names, self._experts)
                if hasattr(e, "quarantined_replicas")}

    def quarantines(self) -> dict[str, int]:
        """expert -> how many times this gateway has put one of its replicas into quarantine (for /metrics)."""
        return {name: e.quarantines for name, e in zip(self.expert_names, self._experts) if hasattr(e, "quarantines")}

    def routable_replicas(self) -> dict[str, int]:
        """expert -> replicas Serve routes to now, as this gateway's routers know (for /metrics)."""
        counts = {name: e.routable_replicas() for name, e in zip(self.expert_names, self._experts)
                  if hasattr(e, "routable_replicas")}
        return {name: n for name, n in counts.items() if n is not None}

    # ---- generation ------------------------------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        """Raise RequestRejected (a ValueError with a user-facing message) for anything the experts would
        choke on (orchestrator/request_checks.py)."""
        check_request(req, Limits(tuple(self.models), self.vocab_size, self.max_model_len))

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield one TokenEvent per generated token; the last carries finish_reason."""
        self.validate(req)
        if req.params.max_tokens == 0:
            return
        if self._native(req):
            e = self.expert_names.index(req.model)
            try:
                async for ev in native_events(self._experts[e], req.model, req, self.vocab_size):
                    yield ev
            except ExpertsUnavailable as exc:
                self.health.failed(e, str(exc))
                raise
            return
        seq = self._sequence(req)
        self._loop.submit(seq)
        try:
            while True:
                ev = await seq.next_event()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            seq.cancel()          # the loop retires it and closes its sessions, whatever state it was in

    def _native(self, req: GenerationRequest) -> bool:
        if req.model == ENSEMBLE:
            return False
        info = self.infos[self.expert_names.index(req.model)]
        return req.params.seed is None or bool(info.extra.get("native_seed", True))

    def _sequence(self, req: GenerationRequest) -> Sequence:
        gate = self._gate if req.model == ENSEMBLE else None          # pin the gate version for this request
        fixed = None if req.model == ENSEMBLE else self.expert_names.index(req.model)
        return Sequence(req.request_id, list(req.prompt_ids), req.params, make_rng(req.params.seed),
                        space=self._space(req.model, gate), k=req.experts_per_token or self.top_k,
                        gate=gate, fixed_expert=fixed)

    def _space(self, model: str, gate: GateRuntime | None) -> str:
        """The mixing space of a request: its gate's (trained for it, or set by config), else the default."""
        return gate.mix_space if gate is not None and model == ENSEMBLE else self.mix_space

    async def _probe_down_experts(self) -> None:
        """Bring a down expert back as soon as a replica of it answers again. Each down expert has one probe
        in flight at a time, bounded by probe_timeout_s, on its own: a hung one holds back no other's return."""
        probes: dict[int, asyncio.Task] = {}
        try:
            while True:
                await asyncio.sleep(self.health.probe_interval_s)
                for e in self.health.down():
                    if e not in probes or probes[e].done():
                        probes[e] = asyncio.create_task(self._probe(e), name=f"probe:{self.expert_names[e]}")
        finally:
            for task in probes.values():
                task.cancel()
            await asyncio.gather(*probes.values(), return_exceptions=True)

    async def _probe(self, e: int) -> None:
        """A down expert is back once a replica answers a one-token step soundly: answering at all is not enough
        from a replica that serves NaN (experts/answer_checks.py)."""
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await self._experts[e].info()
            # The step's own bound is the client's call timeout (the gateway's expert_timeout_s, as
            # probe_timeout_s), which closes on the replica a session it gave up on; cancelling it from out here
            # would leave that session to the replica's idle reaper, so this bound only catches a client
            # without one.
            async with asyncio.timeout(2 * self.probe_timeout_s):
                problem = await self._probe_step(e)
        except Exception as exc:  # noqa: BLE001 - still down; the next round probes again
            problem = f"probe failed: {exc!r}"
        if problem is not None:
            log.debug("expert %s still down: %s", self.expert_names[e], problem)
            self.health.still_down(e, problem)
            return
        self.health.answered(e)
        log.warning("expert %s answers again", self.expert_names[e])

    async def _probe_step(self, e: int) -> str | None:
        """Open a one-token session on expert e and close it -> what was wrong with the answer, or None."""
        sid = f"probe.{self.expert_names[e]}.{self._probe_prefix}.{next(self._probe_ids)}"   # unique per gateway
        token = self.infos[e].eos_token_id or 0
        (out,) = await self._experts[e].open([SessionStep(sid, (token,))], self.logprobs_k)
        if out.error is None:
            await self._experts[e].close([sid])
            why = probe_problem(out, self.vocab_size)
            return None if why is None else f"unsound answer from the replica: {why}"
        return out.error

    # ---- teacher-forced scoring (echo) -----------------------------------------------------------------

    async def score(
        self, request_id: str, token_ids: list[int], model: str, top_logprobs: int = 0
    ) -> list[tuple[float | None, tuple[tuple[int, float], ...]]]:
        """Per token of `token_ids`: its logprob under `model` given the tokens before it (None for the
        first) and the top alternatives. Same routing and mixing code as generation and `ensemble eval`."""
        import torch

        from gating.mix import gate_weights

        self.validate(GenerationRequest(request_id, tuple(token_ids), GenerationParams(max_tokens=0), model=model))
        members = list(range(len(self._experts))) if model == ENSEMBLE else [self.expert_names.index(model)]
        outs = await asyncio.gather(*(self._experts[e].score([list(token_ids)], self.logprobs_k) for e in members))
        for e, (out,) in zip(members, outs):
            if out.error:
                raise RequestRejected(f"expert {self.expert_names[e]}: {out.error}", param="prompt")
            problem = score_problem(out.topk_ids, out.topk_logprobs, self.vocab_size)
            if problem is not None:
                raise ExpertsUnavailable(f"expert {self.expert_names[e]}: unsound answer from the replica: {problem}")
        all_ids, all_lps, targets = stack_scores([o[0] for o in outs])             # [N, E', K], [N]
        n = len(targets)
        gate = self._gate
        if model != ENSEMBLE:
            experts, weights = torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1)
        elif gate is None:
            e = len(self._experts)
            experts, weights = torch.arange(e).expand(n, e), torch.full((n, e), 1.0 / e)
        else:
            experts, weights = gate_weights(gate.sequence_logits(list(token_ids), all_ids, all_lps)[:n], self.top_k)
        ids, lps = select_experts(all_ids, all_lps, experts)                          # [N, S, K]
        mixed = mix(ids, lps, weights, self.vocab_size, self._space(model, gate))
        lp = logprob_of(mixed, targets).tolist()                                       # [N]
        alternatives = ([row.alternatives(top_logprobs) for row in rows_of(mixed, self.vocab_size)] if top_logprobs
                        else [()] * n)
        return [(None, ())] + list(zip(lp, alternatives))
