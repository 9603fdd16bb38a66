"""The lockstep decode loop: every running sequence of this gateway replica advances one token per round.

One round, in numbered phases, each one batched operation over all rows where it can be:
  1) route   one GRU step per gate version for all rows: experts + weights per row     (orchestrator/routing.py)
  2) step    per expert ONE call with every row that selected it (catch-up included). A replica that died
             or timed out has its sessions re-opened elsewhere from the token history (migration); an expert
             that no replica answers for is marked down, its rows keep the experts that did answer, and a row
             left with none is routed again among the rest (degraded routing)
  3) mix     every row's answering experts' top-k, in its request's space                (gating/mix_row.py)
  4) sample  every row from its own request's RNG, from the whole mix (tail included)    (orchestrator/sample.py)
  5) feed    append each token, emit TokenEvents; then one batched gate step per gate version (its own phase,
             gate_step: gate work, counted in the orchestration share like routing)

A round's TokenEvents reach their readers (detokenise, SSE) once the next round's expert calls are written:
the readers' work then overlaps the experts' step instead of delaying it (they would otherwise run first:
asyncio runs ready tasks in order, and the readers woke first). So every call of a round (an expert's opens
and its advances are two calls) is a task of one gather, and the readers are woken a loop turn after those
tasks start, late enough for a call that fans out to several replicas to be written too.

New sequences take their first round (prefill: sessions opened with the whole prompt) as a separate batch
beside the main round, so a long prompt delays only its own first token.

Shape legend: B = rows in the round, E = experts, S = experts answering a row, K = top-k per expert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from collections.abc import Sequence as Seq

import msgspec
import numpy as np

from experts.answer_checks import length_problem, topk_problems
from experts.protocol import Expert, SessionStep, StepOutput, TopK
from gating.mix_row import mix_round
from gating.runtime import Observed
from orchestrator.answer_screen import all_sound
from orchestrator.expert_health import ExpertHealth
from orchestrator.profile import PhaseClock
from orchestrator.request_checks import RequestRejected
from orchestrator.routing import Route, renormalise, route_fixed, route_gated, route_uniform
from orchestrator.sample import sample_round
from orchestrator.sequence import Sequence
from orchestrator.types import AtCapacity, ExpertsUnavailable, GateDecision, TokenEvent

log = logging.getLogger(__name__)
MIGRATABLE = ("unavailable", "engine")
Pair = tuple[int, int]                                  # (row, expert)


class DecodeLoop:
    def __init__(self, experts: list[Expert], names: list[str], *, vocab_size: int, eos_token_id: int | None,
                 max_model_len: int, logprobs_k: int, health: ExpertHealth, clock: PhaseClock) -> None:
        self._experts, self.names = experts, names
        self._expert_names: dict[tuple[int, ...], tuple[str, ...]] = {}      # a route's experts -> their names
        self.vocab_size, self.eos_token_id, self.max_model_len = vocab_size, eos_token_id, max_model_len
        self.logprobs_k, self.health, self.clock = logprobs_k, health, clock
        self._running: list[Sequence] = []
        self._new: list[Sequence] = []
        self._held: list[Sequence] = []                # emitted this round, events not yet delivered
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._side_tasks: set[asyncio.Task] = set()
        self.rounds = 0
        self.migrations = 0            # sessions re-opened on another replica after theirs failed
        self.unsound_answers = 0       # answers rejected by experts/answer_checks.py
        # What the experts were asked to compute, by kind of call: (kind, "rows" | "tokens"). Kinds: "prompt"
        # (a session opened before the request's first token), "join" (opened later, when the gate first picks
        # that expert: the whole context so far), "advance" (new tokens of an open session, catch-up included).
        # A session re-opened after its replica failed (migration) counts as a join, or as a prompt before the
        # request's first token.
        self.work: Counter[tuple[str, str]] = Counter()

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-loop")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._side_tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._deliver()
        for s in self._running + self._new:
            s.fail(ExpertsUnavailable("the gateway is stopping"))
        await self._close_sessions(self._running + self._new)
        self._running, self._new = [], []

    def submit(self, seq: Sequence) -> None:
        self.start()
        self._new.append(seq)
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._running) + len(self._new)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._new:
                fresh, self._new = self._new, []
                self._spawn(self._admit(fresh))
            await self._retire()
            if self._running:
                self._wake.set()                       # more rounds while anything runs
                try:
                    await self._round(list(self._running), "round")   # delivers the last round's events
                except Exception as exc:
                    log.exception("decode round failed")
                    for s in self._running:
                        s.fail(exc)
            else:
                self._deliver()

    async def _admit(self, seqs: list[Sequence]) -> None:
        try:
            with self.clock.phase("admit_gate"):       # each gate version reads its new prompts in one pass
                by_gate: dict[int, list[Sequence]] = {}
                for s in seqs:
                    if s.gate is not None and s.gate_state is None:
                        by_gate.setdefault(id(s.gate), []).append(s)
                for group in by_gate.values():
                    for s, state in zip(group, group[0].gate.prefill_many([s.tokens for s in group])):
                        s.gate_state = state
            await self._round(seqs, "admit")
        except Exception as exc:
            log.exception("admission round failed")
            for s in seqs:
                s.fail(exc)
        self._deliver()                                # first tokens: at once
        self._running.extend(seqs)
        self._wake.set()

    async def _retire(self) -> None:
        done = [s for s in self._running if s.done]
        if done:
            self._running = [s for s in self._running if not s.done]
            self._spawn(self._close_sessions(done))

    # ---- one round -------------------------------------------------------------------------------------

    async def _round(self, seqs: list[Sequence], label: str) -> None:
        t_round = time.perf_counter()
        seqs = [s for s in seqs if not s.done]
        if not seqs:
            return
        phase = _phase_names(label)
        # 1) route
        with self.clock.phase(phase["gate"]):
            routes = self._route(seqs, range(len(seqs)))
        # 2) step the chosen experts (migration and degraded routing inside)
        t_step = time.perf_counter()
        answers, routes, server_s = await self._step(seqs, routes)      # delivers the last round's events
        waited = time.perf_counter() - t_step
        self.clock.add(phase["expert"], waited)
        self.clock.add(phase["rpc"], max(0.0, waited - server_s))
        # 3) mix and 4) sample, every row that has answers
        tokens: dict[int, tuple[int, float, tuple]] = {}
        rows = [i for i, r in enumerate(routes) if r is not None and not seqs[i].done]
        self._mix_and_sample(seqs, routes, answers, rows, tokens, phase)
        # 5) feed back: tokens to sequences and events to readers, then one gate step per gate version
        with self.clock.phase(phase["emit"]):
            stepped = self._feed_back(seqs, routes, tokens)
        with self.clock.phase(phase["gate_step"]):
            self._step_gates(seqs, routes, answers, stepped)
        self.rounds += 1
        self.clock.add(label, time.perf_counter() - t_round)

    def _route(self, seqs: list[Sequence], rows: Seq[int]) -> list[Route | None]:
        """Phase 1 for `rows` of seqs (the others get None)."""
        available = self.health.available()
        routes: list[Route | None] = [None] * len(seqs)
        gated: dict[int, list[int]] = {}
        for i in rows:
            s = seqs[i]
            if s.fixed_expert is not None:
                routes[i] = route_fixed(s.fixed_expert, available)
            elif s.gate is None:
                routes[i] = route_uniform(available)
            else:
                gated.setdefault(id(s.gate), []).append(i)
        for members in gated.values():
            logits = np.stack([seqs[i].gate_state.logits for i in members])              # [R, E]
            for i, r in zip(members, route_gated(logits, [seqs[i].k for i in members], available)):
                routes[i] = r
        return routes

    async def _step(self, seqs: list[Sequence], routes: list[Route | None]):
        """Phase 2 -> (answers {(row, expert): TopK}, routes kept to the experts that answered, replica time)."""
        answers: dict[Pair, TopK] = {}
        server_s = 0.0
        for i, r in enumerate(routes):
            if r is None:
                seqs[i].fail(ExpertsUnavailable("no expert that can serve this request is answering now"))
        todo = [i for i, r in enumerate(routes) if r is not None]
        for _attempt in range(len(self.names)):                # each pass leaves at least one more expert out
            pairs = [(i, e) for i in todo if routes[i] is not None for e in routes[i].experts]
            got, capacity, spent = await self._ask(seqs, pairs)
            answers.update(got)
            server_s = max(server_s, spent)
            retry = []
            for i in todo:
                s, r = seqs[i], routes[i]
                if s.done or r is None:
                    continue
                if all((i, e) in answers for e in r.experts):          # the usual row: every expert answered
                    continue
                kept = renormalise(r, {e for e in r.experts if (i, e) in answers})
                if kept is not None:
                    routes[i] = kept
                else:
                    retry.append(i)
            if not retry:
                break
            rerouted = self._route(seqs, retry)
            for i in retry:
                if rerouted[i] is None or set(rerouted[i].experts) <= set(routes[i].experts):
                    error = AtCapacity if capacity.get(i) else ExpertsUnavailable
                    seqs[i].fail(error("no expert can serve this request now"))
                    routes[i] = None
                else:
                    routes[i] = Route(rerouted[i].experts, rerouted[i].weights, rerouted[i].entropy, degraded=True)
            todo = [i for i in retry if routes[i] is not None]
        for i, s in enumerate(seqs):                            # rows of failed requests take no token
            if s.done and routes[i] is not None and not any((i, e) in answers for e in routes[i].experts):
                routes[i] = None
        return answers, routes, server_s

    async def _ask(self, seqs: list[Sequence], pairs: list[Pair]):
        """One call per expert for `pairs`; sessions lost with their replica are re-opened once (migration).

        Each call's answers are checked and taken as that call returns (_take), while the round still waits
        for its slower calls: only the last call's share of that work follows the round's slowest reply."""
        answers: dict[Pair, TopK] = {}
        capacity: dict[int, bool] = {}
        server_s = 0.0
        for attempt in range(2):
            by_expert: dict[int, list[int]] = {}
            for i, e in pairs:
                by_expert.setdefault(e, []).append(i)
            taken = _Taken()
            pending = asyncio.gather(*(self._take(e, rows, call, seqs, answers, taken)
                                       for e, group in by_expert.items() for rows, call in self._calls(e, group, seqs)))
            # The readers of the last round's tokens run while the experts step: after the calls' first steps,
            # which write their requests (see the module docstring).
            asyncio.get_running_loop().call_soon(self._deliver)
            await pending
            server_s = max(server_s, taken.server_s)
            if taken.unsound and attempt == 0:
                self._quarantine(taken.rejected(), taken.accepted())
            to_close: dict[int, list[str]] = {}                 # rejected sessions, still open on their replica
            lost: list[Pair] = []
            for e in by_expert:
                failed = taken.failed.get(e, ())
                failures = []
                for i, out in failed:
                    s = seqs[i]
                    sid = s.forget(e)
                    if (i, e) in taken.unsound and sid is not None:
                        to_close.setdefault(e, []).append(sid)
                    kind = kind_of(out)
                    if kind == "input":
                        s.fail(RequestRejected(f"expert {self.names[e]}: {out.error}", param="prompt"))
                    elif kind in MIGRATABLE and attempt == 0:
                        lost.append((i, e))
                    else:
                        capacity[i] = capacity.get(i, False) or kind == "capacity"
                        failures.append(out.error or kind)
                if e in taken.answered:
                    self.health.answered(e)
                elif (failures and all(kind_of(o) in MIGRATABLE for _, o in failed if o.error)
                      and not any(x == e for _, x in answers)):
                    # No row of e was answered in this call, first attempt included: a replica that answers
                    # other rows soundly is not down because one context makes it fail twice (those rows keep
                    # their other experts or are routed again).
                    self.health.failed(e, failures[0])
            if to_close:
                self._spawn(self._close_ids(to_close))
            if not lost:
                break
            log.warning("re-opening %d sessions whose replica failed (migration)", len(lost))
            self.migrations += len(lost)
            pairs = lost
        return answers, capacity, server_s

    async def _take(self, e: int, rows: list[int], call: Awaitable[list[StepOutput]], seqs: list[Sequence],
                    answers: dict[Pair, TopK], taken: _Taken) -> None:
        """One call of a round, as it returns: its sound answers into `answers` (the rows' sessions now hold
        every token sent), the rest into `taken` for the round's failure handling."""
        outs = await call
        unsound = self._reject_unsound(e, rows, outs, seqs)
        taken.calls.append((e, rows, outs))
        any_answer = False
        for n, (i, out) in enumerate(zip(rows, outs)):
            if n in unsound:
                taken.unsound.add((i, e))
                out = msgspec.structs.replace(out, topk=None, error=f"unsound answer from the replica: {unsound[n]}",
                                              error_kind="engine")
            elif out.error is None and out.topk is not None:
                answers[(i, e)] = out.topk
                seqs[i].synced[e] = len(seqs[i].tokens)
                any_answer = True
                continue
            taken.failed.setdefault(e, []).append((i, out))
        if any_answer:
            taken.answered.add(e)
        if outs:
            taken.server_s = max(taken.server_s, max(out.server_s for out in outs))

    def _reject_unsound(self, e: int, rows: list[int], outs: list[StepOutput], seqs: list[Sequence]) -> dict[int, str]:
        """Answers of one call that are no next-token distribution (experts/answer_checks.py: a corrupt checkpoint
        answers NaN), or one for another context than the row's (a session that diverged on the replica): index
        in `outs` -> why. They become engine failures of their expert (_take): re-opened once elsewhere from the
        row's tokens, then the expert is marked down and its rows keep their other expert or are routed again,
        like a dead replica's; their sessions, still open on the replica, are closed. On a round's first attempt,
        which asks each replica for all its rows of an expert, a replica none of whose answers was sound is
        quarantined (_quarantine); the re-opens of a second attempt are no such evidence."""
        where = [n for n, out in enumerate(outs) if out.error is None and out.topk is not None]
        tops = [outs[n].topk for n in where]
        problems = ({} if all_sound(tops, self.vocab_size)                  # the usual call: one compiled pass
                    else {where[m]: why for m, why in topk_problems(tops, self.vocab_size).items()})
        for n in where:
            if n not in problems and outs[n].length != len(seqs[rows[n]].tokens):
                problems[n] = length_problem(outs[n].length, len(seqs[rows[n]].tokens))
        for n, why in problems.items():
            log.warning("expert %s, replica %s: unsound answer (%s); treating it as an engine fault",
                        self.names[e], outs[n].replica or "?", why)
        self.unsound_answers += len(problems)
        return problems

    def _quarantine(self, rejected: set[tuple[int, str]], accepted: set[tuple[int, str]]) -> None:
        """A replica none of whose answers for an expert in this round was sound gets no new session of that
        expert for a while (experts/client.py quarantine): the re-opens go to a sibling. One that also answered
        soundly keeps them: one context that fails is that context's fault, not the replica's. Arguments:
        (expert, replica) of every rejected answer, and the set of those that answered soundly."""
        for e, replica in rejected - accepted:
            quarantine = getattr(self._experts[e], "quarantine", None)
            if quarantine is not None and replica:
                quarantine(replica)

    def _calls(self, e: int, rows: list[int],
               seqs: list[Sequence]) -> list[tuple[list[int], Awaitable[list[StepOutput]]]]:
        """One expert, one round: a call opening the sessions it lacks (whole context) and one advancing the
        rest (catch-up), each with its rows. Separate calls, so that each is a task of the round's gather and
        is written before the readers run."""
        expert = self._experts[e]
        opens = [i for i in rows if e not in seqs[i].synced]
        advances = [i for i in rows if e in seqs[i].synced]
        calls = []
        if opens:
            steps = [SessionStep(seqs[i].session_of(e), tuple(seqs[i].tokens)) for i in opens]
            for i, step in zip(opens, steps):
                self._count_work("join" if seqs[i].produced else "prompt", [step])
            calls.append((opens, expert.open(steps, self.logprobs_k)))
        if advances:
            steps = [SessionStep(seqs[i].session_of(e), tuple(seqs[i].tokens[seqs[i].synced[e]:])) for i in advances]
            self._count_work("advance", steps)
            calls.append((advances, expert.advance(steps, self.logprobs_k)))
        return calls

    def _count_work(self, kind: str, steps: list[SessionStep]) -> None:
        self.work[kind, "rows"] += len(steps)
        self.work[kind, "tokens"] += sum(len(step.token_ids) for step in steps)

    def _mix_and_sample(self, seqs, routes, answers, rows: list[int], tokens: dict, phase: dict[str, str]) -> None:
        """Phases 3 and 4 for `rows`: the round's mixes (gating/mix_row.py: row by row, or a top-2 group at once as
        arrays), then one draw per row from its request's generator (a group's plain rows together)."""
        with self.clock.phase(phase["mix"]):
            tops = [[answers[(i, e)] for e in routes[i].experts] for i in rows]
            mixed = mix_round(tops, [routes[i].weights for i in rows], self.vocab_size, [seqs[i].space for i in rows])
        with self.clock.phase(phase["sample"]):
            drawn = sample_round(mixed, [seqs[i].params for i in rows], [seqs[i].rng for i in rows])
            for j, (i, (token, logprob)) in enumerate(zip(rows, drawn)):
                n = seqs[i].params.top_logprobs
                tokens[i] = (token, logprob, mixed.row(j).alternatives(n) if n > 0 else ())

    def _feed_back(self, seqs: list[Sequence], routes: list[Route | None], tokens: dict) -> dict[int, list[int]]:
        """Each row's token to its sequence and its reader -> the rows whose gate takes a step, per gate version."""
        stepped: dict[int, list[int]] = {}
        for i, (token, logprob, alts) in tokens.items():
            s, r = seqs[i], routes[i]
            if s.done:                                        # cancelled while its experts were stepping
                continue
            s.tokens.append(token)
            decision = GateDecision(self._names_of(r.experts), r.weights, r.entropy, r.degraded)
            finish = self._finish_reason(s, token)
            s.emit(TokenEvent(s.request_id, s.produced, token, logprob, decision, alts, finish))
            self._held.append(s)
            if not s.done and s.gate is not None:
                stepped.setdefault(id(s.gate), []).append(i)
        return stepped

    def _step_gates(self, seqs: list[Sequence], routes: list[Route | None], answers: dict[Pair, TopK],
                    stepped: dict[int, list[int]]) -> None:
        """One batched GRU step per gate version over its rows' new tokens (and, for an observed-features gate,
        what the experts that produced them said)."""
        for rows in stepped.values():
            gate = seqs[rows[0]].gate
            observed = _observed(rows, routes, answers) if gate.gate.uses_observations else None  # read only if used
            states = gate.step([seqs[i].gate_state for i in rows], [seqs[i].tokens[-1] for i in rows], observed)
            for i, st in zip(rows, states):
                seqs[i].gate_state = st

    def _names_of(self, experts: tuple[int, ...]) -> tuple[str, ...]:
        names = self._expert_names.get(experts)
        if names is None:
            names = self._expert_names[experts] = tuple(self.names[e] for e in experts)
        return names

    def _finish_reason(self, s: Sequence, token: int) -> str | None:
        p = s.params
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            return "stop"
        if s.produced + 1 >= p.max_tokens or len(s.tokens) >= self.max_model_len:
            return "length"
        return None

    # ---- housekeeping ----------------------------------------------------------------------------------

    async def _close_sessions(self, seqs: list[Sequence]) -> None:
        by_expert: dict[int, list[str]] = {}
        for s in seqs:
            for e, sid in s.sessions.items():
                by_expert.setdefault(e, []).append(sid)
            s.sessions.clear()
            s.synced.clear()
        await self._close_ids(by_expert)

    async def _close_ids(self, by_expert: dict[int, list[str]]) -> None:
        """Close sessions on their experts' replicas; a failure is logged (the replica's reaper ends them)."""
        results = await asyncio.gather(*(self._experts[e].close(ids) for e, ids in by_expert.items()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("closing sessions failed: %r", r)

    def _deliver(self) -> None:
        held, self._held = self._held, []
        for s in held:
            s.deliver()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


ROUND_PHASES = ("gate", "expert", "rpc", "mix", "sample", "emit", "gate_step")


def _observed(rows: list[int], routes: list[Route | None], answers: dict[Pair, TopK]) -> Observed:
    """The top-k of the experts behind each of `rows`' new token, for the gate step (its row r is rows[r])."""
    observed = Observed([], [], [])
    add_row, add_expert, add_top = observed.rows.append, observed.experts.append, observed.tops.append
    for r, i in enumerate(rows):
        for e in routes[i].experts:
            add_row(r)
            add_expert(e)
            add_top(answers[(i, e)])
    return observed


def _phase_names(label: str) -> dict[str, str]:
    """Clock names of a round's phases: bare for the main round, `admit_<phase>` for an admission round. An
    admission round runs beside the main rounds (its expert wait overlaps theirs), so its time is kept apart
    from the per-token path's."""
    return {p: p if label == "round" else f"{label}_{p}" for p in ROUND_PHASES}


def kind_of(out: StepOutput) -> str:
    return out.error_kind or "input"


class _Taken:
    """What a round's calls returned beyond their sound answers (DecodeLoop._take), for _ask."""

    __slots__ = ("answered", "calls", "failed", "server_s", "unsound")

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], list[StepOutput]]] = []   # (expert, rows, outputs) of each call
        self.failed: dict[int, list[tuple[int, StepOutput]]] = {}   # expert -> (row, failed output)
        self.unsound: set[Pair] = set()                          # answers rejected by the checks
        self.answered: set[int] = set()                          # experts with a sound answer
        self.server_s = 0.0                                      # the longest replica time of a call

    def rejected(self) -> set[tuple[int, str]]:
        """(expert, replica) of every answer the checks rejected."""
        return {(e, out.replica) for e, outs in self.failed.items() for i, out in outs if (i, e) in self.unsound}

    def accepted(self) -> set[tuple[int, str]]:
        """(expert, replica) of every sound answer."""
        return {(e, out.replica) for e, rows, outs in self.calls for i, out in zip(rows, outs)
                if out.error is None and out.topk is not None and (i, e) not in self.unsound}
