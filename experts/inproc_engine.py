"""vLLM's engine inside the replica's process, stepped by one thread: the part of AsyncLLM that experts/ uses.

Why: on CPU, AsyncLLM runs three processes per expert (the replica, vLLM's EngineCore, its Worker) joined by
ZeroMQ and a shared-memory queue whose readers busy-poll. A decode-session step crosses both hops twice.
Measured on the 2-core machine (`scripts/measure_expert_stepping.py --streams 1 8 32 --cpu-threads-bind 1
--engine-process separate|inproc`, one code expert, top-20, bf16): a session step took 6.2 / 17.5 / 22.3 ms at
1 / 8 / 32 sessions through AsyncLLM, 4.2 / 8.4 / 12.6 ms here. So on CPU the engine runs here: vLLM's LLMEngine
with multiprocessing off (scheduler, uniprocessor executor and model in this process), driven by a thread that
steps it whenever it has work and sleeps otherwise.

The interface is AsyncLLM's, as far as sessions.py, generations.py and scoring.py use it:
  generate(prompt | async iterator of StreamingInput, params, request_id) -> async iterator of RequestOutput
  check_health(), shutdown()
plus batched decode sessions, one engine command per call: open_sessions(), feed_sessions(), abort_session().
Every engine call (adding, aborting, stepping) happens on the engine thread; the event loop only posts
commands and receives outputs, so vLLM's engine is never touched from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

log = logging.getLogger(__name__)

_STOP = object()


class EngineDead(RuntimeError):
    """The engine thread has stopped (an error in a step, or shutdown)."""


class InprocEngine:
    """One LLMEngine, one stepping thread, many asyncio consumers."""

    def __init__(self, args: dict[str, Any], threads: int | None = None, cores: set[int] | None = None) -> None:
        """Build the engine on its own thread and wait until it is ready (raises what building raised).

        `threads`: torch intra-op threads for the model (None: torch's default); `cores`: pin the engine thread
        (and the compute threads it starts) to these cores."""
        self._engine: Any = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()                     # guards _streams between the loop and the thread
        self.error: BaseException | None = None
        self.steps = 0
        self.output_steps = 0     # steps that produced outputs (not the empty ones that only release finished ids)
        self.step_s = 0.0         # wall time inside vLLM's engine steps (this thread), for the speed breakdown
        self.feeds = 0            # feed_sessions commands posted
        self.opens = 0            # open_sessions commands posted
        self._raw: set[str] = set()                      # engine thread only: requests answered raw
        self._fed: dict[str, _FeedBatch] = {}             # engine thread only: session -> its open/feed call
        self._turn: list[tuple] = []                      # session commands of this loop turn, not queued yet
        self._turn_lock = threading.Lock()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(args, threads, cores, ready),
                                        name="vllm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._engine is None:
            self._thread.join()
            raise self.error if self.error is not None else RuntimeError("the vLLM engine did not start")

    @staticmethod
    def _build(args: dict[str, Any], threads: int | None, cores: set[int] | None) -> Any:
        """On the engine thread: vLLM builds, warms up and later runs the model on one thread (its model
        runner keeps per-thread state: OpenMP's thread count, torch's inference mode)."""
        import torch
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from experts import session_rows
        from experts.thread_priority import idle_helper_threads, lower_this_thread
        from experts.vllm_engine import _environment

        # Before the engine, so that the compute threads it starts inherit both: its cores, and a priority
        # below the threads that relay its results.
        if cores:
            os.sched_setaffinity(threading.get_native_id(), cores & os.sched_getaffinity(0) or os.sched_getaffinity(0))
        lower_this_thread()
        if threads:
            torch.set_num_threads(threads)        # before the engine: vLLM's CPU worker disables it afterwards

        session_rows.install()                # sessions keep their rows in vLLM's persistent batch
        # vLLM reads this while the engine is built: engine core and executor in this process.
        with _environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
            engine = LLMEngine.from_engine_args(EngineArgs(**args))
        idle_helper_threads()                 # gloo's polling threads (one process: nothing to send) never preempt
        _warm_logprobs(engine)
        return engine

    # ---- AsyncLLM's interface -------------------------------------------------------------------------

    raw_outputs = True     # generate(..., raw=True) is available (see below)

    async def generate(self, prompt: Any, params: Any, request_id: str, raw: bool = False) -> AsyncIterator[Any]:
        """RequestOutputs of one request. `prompt` may be an async iterator of StreamingInput chunks: a
        resumable request, one output per chunk (as AsyncLLM's streaming input), until the caller closes it.

        raw=True yields vLLM's EngineCoreOutputs instead (token ids and logprob arrays, no detokenizer or
        logprob dicts): vLLM's output processor is skipped, which at 32 sessions was half of a step's time."""
        self._check()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (loop, outputs)
        streaming = hasattr(prompt, "__aiter__")
        feeder = loop.create_task(self._feed(request_id, prompt, params, raw)) if streaming else None
        if not streaming:
            self._put(("add", request_id, prompt, params, False, raw))
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    finished = isinstance(out, EngineDead)    # a refused chunk leaves the request to abort
                    raise out
                yield out
                if not streaming and (out.finish_reason is not None if raw else out.finished):
                    finished = True
                    return
        finally:
            if feeder is not None:
                feeder.cancel()
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._put(("abort", request_id))

    async def _feed(self, request_id: str, chunks: AsyncIterator[Any], params: Any, raw: bool) -> None:
        try:
            async for chunk in chunks:
                self._put(("add", request_id, chunk.prompt, chunk.sampling_params or params, True, raw))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the consumer hears of it
            self._deliver({request_id: exc})

    feeds_sessions = True     # feed_sessions() is available (see below)

    async def feed_sessions(self, chunks: list[tuple[str, list[int]]], params: Any) -> list[Any]:
        """Append one chunk to each of several open sessions (resumable raw requests started by open_sessions()
        or generate()) with ONE command, and return each one's next raw output (with logprobs), or the
        exception that ended it, in order. A session's own generate() stream, if it has one, is not involved:
        its consumer keeps waiting and closes the request as before.

        Why: through generate(), every session of a batched step costs an asyncio task, two async generator
        hops, a queue each way, vLLM's input processing (validation, a deep copy of the sampling params, a
        new Request object) and a wake-up of its consumer; at 16 to 32 sessions per step that was a third
        of the engine's CPU (`scripts/measure_expert_stepping.py`, CPU ms per step)."""
        done = self._post("feed", chunks, params)
        self.feeds += 1
        return await done

    opens_sessions = True     # open_sessions() is available (see below)

    async def open_sessions(self, prompts: list[tuple[str, list[int]]], params: Any) -> list[Any]:
        """Start several sessions (resumable raw requests) with their prompts with ONE command, and return
        each one's first raw output (with logprobs), or the exception that refused or ended it, in order.
        Later chunks go through feed_sessions; abort_session ends one. No generate() stream is involved.

        Why: through generate(), each session cost a task, a stream and a feeder task for as long as it lived,
        and its prompt reached the engine a few event-loop turns after the open call, later than an advance
        of the same expert asked in the same turn. The command is posted before this coroutine first yields
        (as feed_sessions' is), so both reach the engine together."""
        done = self._post("open", prompts, params)
        self.opens += 1
        return await done

    def _post(self, kind: str, chunks: list[tuple[str, list[int]]], params: Any) -> asyncio.Future:
        """Post one batched session command; the future gets its answers, in order. The session commands of
        one event-loop turn reach the engine thread together (`_flush_turn`)."""
        self._check()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        with self._turn_lock:
            first = not self._turn
            self._turn.append((kind, chunks, params, done, loop))
        if first:
            loop.call_soon(self._flush_turn)
        return done

    def _flush_turn(self) -> None:
        """Queue this turn's session commands as ONE item, once the callbacks that were ready with the first of
        them have run. Why: the engine thread takes every queued item before it steps, but it wakes on the first
        one; an open and an advance asked in one turn and queued apart could be split by a step started in
        between (the event loop's thread descheduled, or made to drop the GIL, between the two posts), and the
        round then waited for two engine steps instead of one. Under load that happened (tests/integration/
        test_inproc_engine.py, the open and the advance asked in one loop turn)."""
        with self._turn_lock:
            turn, self._turn = self._turn, []
        if turn:
            self._put(("turn", turn))

    def abort_session(self, request_id: str) -> None:
        """End a session started by open_sessions (frees its slot and KV blocks); unknown ids are ignored."""
        self._put(("abort", request_id))

    async def check_health(self) -> None:
        self._check()

    async def requests_held(self) -> int:
        """Requests the engine's scheduler holds (running, waiting, paused sessions), counted on the engine
        thread after every command posted before this call (so after earlier closes and aborts)."""
        self._check()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._put(("count", answer, loop))
        return await answer

    async def on_model(self, fn: Any) -> Any:
        """fn(the engine's model) on the engine thread, after every command posted before -> its result (fault
        injection: experts/fault_injection.py)."""
        self._check()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._put(("model", fn, answer, loop))
        return await answer

    def shutdown(self) -> None:
        """Stop the thread and free the engine. Idempotent."""
        if self._thread.is_alive():
            self._flush_turn()                   # like every other command: after the session commands asked before
            self._commands.put(_STOP)
            self._thread.join(timeout=30)
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.debug("engine shutdown: %r", exc)

    # ---- the engine thread ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {type(self.error).__name__}: {self.error}") from self.error
        if not self._thread.is_alive():
            raise EngineDead("the engine thread is not running")

    @property
    def thread_id(self) -> int | None:
        """The engine thread's OS thread id (for diagnostics and tests)."""
        return self._thread.native_id

    def _run(self, args: dict[str, Any], threads: int | None, cores: set[int] | None,
             ready: threading.Event) -> None:
        try:
            engine = self._build(args, threads, cores)
            self._tasks = engine.get_supported_tasks()
            scheduler = engine.engine_core.engine_core.scheduler
        except BaseException as exc:  # noqa: BLE001 - raised again by __init__
            self.error = exc
            ready.set()
            return
        self._engine = engine
        ready.set()
        try:
            while True:
                # Block for a command only when there is nothing to step (paused sessions are not work).
                block = not scheduler.has_requests()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if command is _STOP:
                        return
                    self._apply(command)
                    block = False
                if scheduler.has_requests():
                    self._step(engine)
        except BaseException as exc:
            log.exception("vLLM engine thread failed")
            self.error = exc
            with self._lock:
                ids = list(self._streams)
            self._deliver({rid: self._dead() for rid in ids})
            for rid, batch in list(self._fed.items()):
                batch.answer(rid, self._dead())
            self._fed.clear()
            self._fail_queued()

    def _dead(self) -> EngineDead:
        return EngineDead(f"the engine stopped: {type(self.error).__name__}: {self.error}")

    def _put(self, command: Any) -> None:
        """Post a command to the engine thread, after the session commands of this turn (commands reach the
        engine in the order they were asked). If the thread has stopped meanwhile, answer it here: the thread
        drains the queue once after setting `error`, and a command posted after that drain finds `error` set."""
        if command[0] != "turn":
            self._flush_turn()
        self._commands.put(command)
        if self.error is not None:
            self._fail_queued()

    def _fail_queued(self) -> None:
        """Answer every command still queued with EngineDead (the thread has stopped), so that no caller waits
        forever. Requests added through generate() heard it through their streams already."""
        dead = self._dead()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is _STOP:
                continue
            for c in command[1] if command[0] == "turn" else (command,):
                if c[0] in ("open", "feed"):
                    _, chunks, _, done, loop = c
                    _call_soon(loop, _resolve, done, [dead] * len(chunks))
                elif c[0] == "count":
                    _, answer, loop = c
                    _call_soon(loop, _fail, answer, dead)
                elif c[0] == "model":
                    _, _, answer, loop = c
                    _call_soon(loop, _fail, answer, dead)

    def _step(self, engine: Any) -> None:
        """One engine step (LLMEngine.step without its stats): raw requests get their EngineCoreOutput, the
        others what vLLM's output processor makes of theirs."""
        t0 = time.perf_counter()
        outputs = engine.engine_core.get_output()
        self.steps += 1
        self.step_s += time.perf_counter() - t0
        if not outputs.outputs:                  # e.g. the step vLLM takes to release aborted requests' ids
            return
        self.output_steps += 1
        items = {o.request_id: o for o in outputs.outputs if o.request_id in self._raw}
        cooked = len(items) < len(outputs.outputs)          # some requests want vLLM's RequestOutputs
        for o in items.values():
            if o.finished:
                self._raw.discard(o.request_id)
        if self._fed:
            for rid in [rid for rid in items if rid in self._fed]:
                o = items.pop(rid)              # a fed session's outputs go to its call, not its generate() stream
                if o.new_logprobs is not None:
                    self._fed.pop(rid).answer(rid, o)
                elif o.finished:
                    self._fed.pop(rid).answer(rid, EngineDead(f"the engine ended session {rid!r} ({o.finish_reason})"))
                # else a partial prefill of a long chunk: its answer comes with a later step
        if cooked:
            processed = engine.output_processor.process_outputs(outputs.outputs, outputs.timestamp)
            if processed.reqs_to_abort:
                engine.engine_core.abort_requests(processed.reqs_to_abort)
            items.update((o.request_id, o) for o in processed.request_outputs)
        self._deliver(items)

    def _apply(self, command: tuple) -> None:
        kind, request_id = command[0], command[1]
        engine = self._engine
        if kind == "turn":                                # one loop turn's session commands, in order
            for c in command[1]:
                self._apply(c)
            return
        if kind == "count":
            answer, loop = command[1], command[2]
            held = sum(engine.engine_core.engine_core.scheduler.get_request_counts())
            _call_soon(loop, _resolve, answer, held)      # its caller's loop may have closed: not the engine's end
            return
        if kind == "model":
            fn, answer, loop = command[1:]
            try:
                (result,) = engine.apply_model(fn)
            except BaseException as exc:  # noqa: BLE001 - its caller hears of it; the engine lives on
                _call_soon(loop, _fail, answer, exc)
            else:
                _call_soon(loop, _resolve, answer, result)
            return
        if kind == "feed":
            self._feed_sessions(*command[1:])
            return
        if kind == "open":
            self._open_sessions(*command[1:])
            return
        if kind == "abort":
            self._raw.discard(request_id)
            if request_id in self._fed:
                self._fed.pop(request_id).answer(request_id, EngineDead(f"session {request_id!r} was closed"))
            engine.output_processor.abort_requests([request_id], internal=True)
            # Directly too: the output processor passes on only the ids it tracks, and raw ones it does not.
            engine.engine_core.abort_requests([request_id])
            return
        _, _, prompt, params, resumable, raw = command
        try:
            self._add(request_id, prompt, params, resumable, raw)
        except Exception as exc:  # noqa: BLE001 - a refused request fails itself, not the engine
            self._deliver({request_id: exc})

    def _add(self, request_id: str, prompt: Any, params: Any, resumable: bool, raw: bool) -> None:
        """Hand one request (or a resumable request's next chunk) to the engine; raises if it is refused."""
        engine = self._engine
        request = engine.input_processor.process_inputs(request_id, prompt, params,
                                                        supported_tasks=self._tasks, resumable=resumable)
        request.external_req_id = request_id          # our ids are unique already: internal = external
        if raw:
            self._raw.add(request_id)
        else:
            engine.output_processor.add_request(request, None, None, 0)
        # The scheduler and the output processor both extend a session's prompt_token_ids on each chunk;
        # across processes each has its own copy, in one process they must not share the list.
        engine.engine_core.add_request(msgspec.structs.replace(
            request, prompt_token_ids=list(request.prompt_token_ids or ())))

    def _open_sessions(self, prompts: list[tuple[str, list[int]]], params: Any, done: asyncio.Future,
                       loop: asyncio.AbstractEventLoop) -> None:
        """Start each session as the first chunk of a resumable raw request; its first output answers the
        call (as a feed_sessions chunk's does)."""
        from vllm.inputs import TokensPrompt

        scheduler = self._engine.engine_core.engine_core.scheduler
        batch = _FeedBatch([rid for rid, _ in prompts], done, loop)
        for rid, tokens in prompts:
            if rid in self._fed or rid in scheduler.requests:
                batch.answer(rid, ValueError(f"session {rid!r} is already open in the engine"))
                continue
            try:
                self._add(rid, TokensPrompt(prompt_token_ids=list(tokens)), params, True, True)
            except Exception as exc:  # noqa: BLE001 - a refused prompt fails its session, not the engine
                self._raw.discard(rid)
                batch.answer(rid, exc)
                continue
            self._fed[rid] = batch

    def _feed_sessions(self, chunks: list[tuple[str, list[int]]], params: Any, done: asyncio.Future,
                       loop: asyncio.AbstractEventLoop) -> None:
        """Queue each chunk as the next input of its session, as the scheduler's add_request does for a
        resumable request's next StreamingInput, minus the input processor: the caller validated the tokens,
        and the session keeps its processed sampling params while the top-k asked for is the same."""
        from vllm.v1.request import StreamingUpdate

        scheduler = self._engine.engine_core.engine_core.scheduler
        batch = _FeedBatch([rid for rid, _ in chunks], done, loop)
        now = time.time()
        for rid, tokens in chunks:
            request = scheduler.requests.get(rid)
            if request is None or not request.resumable or rid in self._fed:
                batch.answer(rid, EngineDead(f"session {rid!r} is not open in the engine"))
                continue
            same = request.sampling_params.logprobs == params.logprobs
            update = StreamingUpdate(mm_features=None, prompt_token_ids=list(tokens), max_tokens=params.max_tokens,
                                     arrival_time=now, sampling_params=request.sampling_params if same else params.clone())
            try:
                scheduler.add_request(_Chunk(rid, update))
            except Exception as exc:  # noqa: BLE001 - a refused chunk fails its session, not the engine
                batch.answer(rid, exc)
                continue
            self._fed[rid] = batch
            self._raw.add(rid)          # each chunk's answer ends "finished" (max_tokens=1); the session goes on

    def _deliver(self, items: dict[str, Any]) -> None:
        """Hand outputs (or exceptions) to their consumers' event loops: one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for rid, item in items.items():
                entry = self._streams.get(rid)
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, batch in by_loop.items():
            _call_soon(loop, _put_all, batch)


def _warm_logprobs(engine: Any) -> None:
    """One step that asks for logprobs, before the replica says it is ready. vLLM compiles its logprob-rank
    function (`batched_count_greater_than`, torch.compile) on the first such step: about 1.7 s of CPU on the
    dev machine, which the first request to each expert used to wait for (a cold service's first top-2
    completion: 3.8 s to its first token, against 0.03 s for the next one)."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import SamplingParams

    engine.add_request("warm-up-logprobs", TokensPrompt(prompt_token_ids=[0, 1]),
                       SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, detokenize=False))
    while engine.has_unfinished_requests():
        engine.step()


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class _Chunk:
    """What the scheduler's add_request reads from a resumable request's next input (StreamingUpdate)."""

    resumable = True

    def __init__(self, request_id: str, update: Any) -> None:
        self.request_id = request_id
        self.mm_features = update.mm_features
        self.prompt_token_ids = update.prompt_token_ids
        self.max_tokens = update.max_tokens
        self.arrival_time = update.arrival_time
        self.sampling_params = update.sampling_params


class _FeedBatch:
    """One open_sessions or feed_sessions call on the engine thread: resolves its future once every session has
    answered."""

    def __init__(self, request_ids: list[str], done: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self._order = request_ids
        self._answers: dict[str, Any] = {}
        self._done, self._loop = done, loop

    def answer(self, request_id: str, output: Any) -> None:
        self._answers[request_id] = output
        if len(self._answers) == len(self._order):
            _call_soon(self._loop, _resolve, self._done, [self._answers[rid] for rid in self._order])


def _resolve(done: asyncio.Future, result: list[Any]) -> None:
    if not done.done():                   # the caller may have been cancelled meanwhile
        done.set_result(result)


def _fail(done: asyncio.Future, exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:                  # that loop is closed: its caller is gone
        pass
