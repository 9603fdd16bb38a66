"""The Expert protocol over one vLLM AsyncLLM: token ids in, raw top-k next-token logprobs out. No Ray here.

A decode session is one resumable vLLM streaming-input request; open/advance feed it the next chunk of tokens
and return the model's log-softmax top-k after them. score() is teacher-forced via prompt_logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import numbers
import os
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

from experts.config import ExpertConfig
from experts.protocol import ExpertInfo, ScoreOutput, SessionStep, StepOutput, TopK
from experts.tokenizer_check import tokenizer_fingerprint

log = logging.getLogger(__name__)

# One position's logprobs as vLLM returns them: {token_id: Logprob(logprob, rank, decoded_token)}.
PositionLogprobs = dict[int, Any]


class VLLMExpert:
    """One expert model in one vLLM engine, serving batched session steps and teacher-forced scoring."""

    def __init__(self, config: ExpertConfig | dict, engine: Any | None = None) -> None:
        self.config = config if isinstance(config, ExpertConfig) else ExpertConfig(**config)
        self._info = read_expert_info(self.config)
        self._engine = engine if engine is not None else start_engine(self.config)
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()  # makes engine request ids unique even when a session id is reused

    # ---- protocol -------------------------------------------------------------------------------------

    async def info(self) -> ExpertInfo:
        return self._info

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """Start one decode session per step with its whole prompt; all prompts prefill in one engine batch."""
        await self._close_idle_sessions()
        errors = self._validate_open(steps, top_k)
        # Register before the first await so a concurrent open of the same id sees it as a duplicate.
        for step, err in zip(steps, errors):
            if err is None:
                rid = f"{step.session_id}#{next(self._ids)}"
                self._sessions[step.session_id] = _Session(rid, self._engine)
        return list(await asyncio.gather(*(
            self._feed(step, top_k, opening=True) if err is None else _ready(_failed_step(step, err))
            for step, err in zip(steps, errors)
        )))

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        """Append 1..n tokens per session (n > 1 = catch-up after being skipped) and return the next top-k."""
        errors = self._validate_advance(steps, top_k)
        return list(await asyncio.gather(*(
            self._feed(step, top_k, opening=False) if err is None else _ready(_failed_step(step, err))
            for step, err in zip(steps, errors)
        )))

    async def close(self, session_ids: list[str]) -> None:
        """Free the sessions' engine slots and KV blocks. Unknown or already closed ids are ignored."""
        sessions = [s for sid in session_ids if (s := self._sessions.pop(sid, None)) is not None]
        await asyncio.gather(*(s.close() for s in sessions))

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        """Teacher-forced top-k and target logprobs per position (see ScoreOutput and _score_windows)."""
        k_err = self._top_k_error(top_k)
        return list(await asyncio.gather(*(self._score_one(list(seq), top_k, k_err) for seq in sequences)))

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise if the engine is dead (the Serve replica's health check calls this)."""
        await self._engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine-core process. Idempotent; the expert is unusable afterwards."""
        engine, self._engine = self._engine, None
        if engine is not None:
            # Shut down now, while the interpreter is intact: AsyncLLM.__del__ at exit would fail noisily.
            engine.shutdown()

    @property
    def engine(self) -> Any:
        """The underlying vllm AsyncLLM (for measurement scripts; the protocol methods are the API)."""
        return self._engine

    @property
    def num_open_sessions(self) -> int:
        return len(self._sessions)

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

    def _validate_open(self, steps: list[SessionStep], top_k: int) -> list[str | None]:
        k_err = self._top_k_error(top_k)
        free = self.config.session_capacity() - len(self._sessions)
        seen: set[str] = set()
        errors: list[str | None] = []
        for step in steps:
            sid = step.session_id
            err = k_err or self._token_error(step.token_ids, f"prompt of session {sid!r}") \
                or self._length_error(len(step.token_ids), f"prompt of session {sid!r}")
            if err is None and (sid in self._sessions or sid in seen):
                err = f"session {sid!r} is already open (duplicate open); close it first or use a new id"
            if err is None and free <= 0:
                # A paused session keeps its vLLM scheduler slot; past max_num_seqs new requests would wait
                # forever instead of failing.
                err = (f"expert {self.config.name!r} is at session capacity ({self.config.session_capacity()} "
                       f"open, from max_num_seqs={self.config.max_num_seqs}); close sessions first")
            if err is None:
                free -= 1
            seen.add(sid)
            errors.append(err)
        return errors

    def _validate_advance(self, steps: list[SessionStep], top_k: int) -> list[str | None]:
        k_err = self._top_k_error(top_k)
        seen: set[str] = set()
        errors: list[str | None] = []
        for step in steps:
            sid = step.session_id
            session = self._sessions.get(sid)
            err = k_err or self._token_error(step.token_ids, f"advance of session {sid!r}")
            if err is None and session is None:
                err = f"session {sid!r} is unknown or closed: open it before advancing"
            elif err is None and (session.busy or sid in seen):
                err = f"session {sid!r} is busy: one open/advance per session at a time"
            elif err is None:
                err = self._length_error(session.length + len(step.token_ids), f"advance of session {sid!r}")
            seen.add(sid)
            errors.append(err)
        return errors

    # ---- engine calls ------------------------------------------------------------------------------------

    async def _close_idle_sessions(self) -> None:
        """Close sessions nobody advanced for session_idle_timeout_s: a crashed caller must not leak slots."""
        deadline = time.monotonic() - self.config.session_idle_timeout_s
        idle = [sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.busy]
        if idle:
            log.warning("expert %s: closing %d idle sessions", self.config.name, len(idle))
            await self.close(idle)

    async def _feed(self, step: SessionStep, top_k: int, opening: bool) -> StepOutput:
        session = self._sessions[step.session_id]
        try:
            position = await session.feed([int(t) for t in step.token_ids], _step_params(int(top_k)))
        except asyncio.CancelledError:
            # The caller gave up mid-step (e.g. a cancelled handle call): the context is now unknown.
            self._sessions.pop(step.session_id, None)
            asyncio.ensure_future(session.close())
            raise
        except Exception as exc:  # noqa: BLE001 - one broken session must not fail the batch
            log.warning("expert %s: session %s failed: %r", self.config.name, step.session_id, exc)
            self._sessions.pop(step.session_id, None)
            await session.close()
            verb = "open" if opening else "advance"
            return _failed_step(step, f"{verb} failed in the engine, session closed: {_describe(exc)}")
        return StepOutput(step.session_id, topk=_topk(position, top_k), length=session.length)

    async def _score_one(self, seq: list[int], top_k: int, k_err: str | None) -> ScoreOutput:
        err = k_err or self._token_error(seq, "sequence to score")
        if err is not None:
            return ScoreOutput(tuple(seq), error=err)
        seq, top_k = [int(t) for t in seq], int(top_k)  # numpy ints do not serialize to the engine
        try:
            rows = await _score_windows(self._engine, seq, top_k, self.config.max_session_len, self._ids)
        except Exception as exc:  # noqa: BLE001 - one failed sequence must not fail the batch
            log.warning("expert %s: score failed: %r", self.config.name, exc)
            return ScoreOutput(tuple(seq), error=f"score failed in the engine: {_describe(exc)}")
        tops = [_topk(row, top_k, exclude=target) for row, target in zip(rows, seq[1:])]
        return ScoreOutput(
            token_ids=tuple(seq),
            topk_ids=tuple(t.token_ids for t in tops),
            topk_logprobs=tuple(t.logprobs for t in tops),
            target_logprobs=tuple(float(row[target].logprob) for row, target in zip(rows, seq[1:])),
        )


class _Session:
    """One vLLM streaming-input request: each fed chunk is appended to the context and answered with one
    sampled position. vLLM drops the token it sampled for a chunk before appending the next chunk
    (Scheduler._update_request_as_session), so only the tokens we feed are ever in the context."""

    def __init__(self, request_id: str, engine: Any) -> None:
        self.request_id = request_id
        self.length = 0
        self.busy = False
        self.last_used = time.monotonic()
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        self._outputs: AsyncGenerator[Any, None] | None = None
        self._engine = engine
        self._close_requested = False

    async def _inputs(self) -> AsyncGenerator[Any, None]:
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        while (chunk := await self._chunks.get()) is not None:
            tokens, params = chunk
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=tokens), sampling_params=params)

    async def feed(self, tokens: list[int], params: Any) -> PositionLogprobs:
        self.busy = True
        try:
            self._chunks.put_nowait((tokens, params))
            if self._outputs is None:
                self._outputs = self._engine.generate(self._inputs(), params, request_id=self.request_id)
            out = await anext(self._outputs)
            self.length += len(tokens)
            return out.outputs[0].logprobs[-1]
        finally:
            self.busy = False
            self.last_used = time.monotonic()
            if self._close_requested:
                await self.close()

    async def close(self) -> None:
        if self.busy:  # closing a generator mid-step raises; the running feed() closes it when it returns
            self._close_requested = True
            return
        self._chunks.put_nowait(None)
        if self._outputs is not None:
            # aclose() makes AsyncLLM.generate abort the request, which frees its slot and KV blocks.
            await self._outputs.aclose()
            self._outputs = None


def plan_score_windows(length: int, window: int) -> list[tuple[int, int]]:
    """(start, keep_from) per window so that the kept rows tile the predictions 0..length-2 exactly once.

    A window covers tokens [start, start + window); its row i predicts token start + i + 1. Sequences that
    fit are one window. Longer ones use stride window//2: the first window keeps all rows, each later one
    only its last `stride` rows, so every prediction sees at least window - stride tokens of context (a
    sliding context, not the full prefix, which the model could not attend to anyway).
    """
    if length <= window:
        return [(0, 0)]
    if window < 2:
        raise ValueError(f"cannot score {length} tokens in windows of {window}: need max_model_len >= 3")
    stride = max(1, window // 2)
    starts = [0] + list(range(stride, length - window + stride, stride))
    return [(s, 0 if s == 0 else window - 1 - stride) for s in starts]


async def _score_windows(engine: Any, seq: list[int], top_k: int, window: int,
                         ids: itertools.count) -> list[PositionLogprobs]:
    """Row j = logprobs predicting seq[j+1] from seq[..j], for j in 0..T-2.

    vLLM's prompt_logprobs[i] (i >= 1) describes prompt token i given tokens < i; entry 0 is None.
    """
    plan = plan_score_windows(len(seq), window)
    results = await asyncio.gather(*(
        _prompt_logprobs(engine, seq[s:s + window], top_k, f"score#{next(ids)}") for s, _ in plan
    ))
    rows: list[PositionLogprobs] = []
    for (_, keep_from), prompt_lps in zip(plan, results):
        rows.extend(prompt_lps[1 + keep_from:])
    if len(rows) != len(seq) - 1:
        raise RuntimeError(f"score windows produced {len(rows)} rows for {len(seq)} tokens")
    return rows


async def _prompt_logprobs(engine: Any, tokens: list[int], top_k: int, request_id: str) -> list[Any]:
    from vllm.inputs import TokensPrompt

    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=tokens), _score_params(top_k), request_id):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    return list(final.prompt_logprobs)


@functools.lru_cache(maxsize=64)
def _step_params(top_k: int) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # Greedy so the sampled token is inside the top-k (otherwise vLLM appends it as a (k+1)-th entry);
    # the logprobs are raw log-softmax (logprobs_mode="raw_logprobs"), untouched by temperature.
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, detokenize=False, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


@functools.lru_cache(maxsize=64)
def _score_params(top_k: int) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                          ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


def _topk(position: PositionLogprobs, k: int, exclude: int | None = None) -> TopK:
    """Top-k of one position, descending. vLLM adds the sampled/actual token when it is outside the top-k;
    that extra entry (rank > k) is dropped."""
    items = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    if len(items) > k:
        items = [kv for kv in items if not (kv[0] == exclude and (kv[1].rank or 0) > k)]
    items = items[:k]
    return TopK(tuple(int(t) for t, _ in items), tuple(float(lp.logprob) for _, lp in items))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _failed_step(step: SessionStep, error: str) -> StepOutput:
    return StepOutput(step.session_id, error=error)


async def _ready(output: StepOutput) -> StepOutput:
    """An already-known result as an awaitable, to sit next to engine calls in one gather()."""
    return output


def _describe(exc: BaseException) -> str:
    # EngineGenerateError carries no message; the real cause is chained.
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def start_engine(config: ExpertConfig) -> Any:
    """Build the vLLM AsyncLLM for this expert (spawns the engine-core process; needs a __main__ guard)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    _require_checkpoint(config.model_path)
    args = {"disable_log_stats": True, **config.engine_args()}
    # The engine-core process inherits the environment at spawn: the same variables a Serve replica gets
    # through runtime_env, set only while this engine starts so several engines in one process may differ.
    with _environment(config.env_vars()):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_expert_info(config: ExpertConfig) -> ExpertInfo:
    """ExpertInfo from the checkpoint files alone (config.json, generation_config.json, tokenizer)."""
    path = _require_checkpoint(config.model_path)
    hf = json.loads((path / "config.json").read_text())
    hf_text = hf.get("text_config", hf)  # multimodal wrappers nest the language model's config
    return ExpertInfo(
        name=config.name,
        model_path=str(path),
        vocab_size=int(hf_text["vocab_size"]),
        max_model_len=config.max_model_len,
        tokenizer_fingerprint=tokenizer_fingerprint(path),
        eos_token_id=_eos_id(path, hf_text),
        extra={"dtype": config.dtype, "max_top_k": config.max_top_k,
               "session_capacity": config.session_capacity(), "stepping": "vllm-streaming-input"},
    )


def _require_checkpoint(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expert checkpoint {model_path!r}: no config.json (expected a Hugging Face "
                                "checkpoint directory with config.json, weights and tokenizer files)")
    return path.resolve()


def _eos_id(path: Path, hf: dict[str, Any]) -> int | None:
    eos = hf.get("eos_token_id")
    gen = path / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if isinstance(eos, list):  # several stop ids: the first is the canonical end-of-sequence
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None
