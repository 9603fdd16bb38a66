"""Measure lockstep decode stepping of one vLLM expert, both ways, at 1 and N concurrent sessions.

(a) fresh request per step: the whole prefix, max_tokens=1, prefix caching on (only here, for comparison);
(b) streaming-input session: the library's VLLMExpert (one resumable request per session, one chunk per step).
Both feed the same predetermined tokens and must return the same top-k; the script checks that.
(c) the reference, in process: vLLM decoding each stream on its own (max_tokens = steps, same top-k logprobs).
--via-serve measures (b) through Ray Serve (ServeExpertClient -> ExpertServer), i.e. with the per-step RPC.

    .venv/bin/python scripts/measure_expert_stepping.py --model artifacts/demo/experts/code [--via-serve]
    .venv/bin/python scripts/measure_expert_stepping.py --streams 1 8 32 --cpu-threads-bind 1 --engine-process separate
    .venv/bin/python scripts/measure_expert_stepping.py --streams 1 16 --variants b --cpu-threads-bind nobind \
        --cpu-threads 1 [--no-enforce-eager]        # the served placement; compiled (README "Compiled engines")
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import time

from experts.config import ExpertConfig
from experts.protocol import SessionStep, TopK
from experts.vllm_engine import topk_of as _topk
from experts.vllm_expert import VLLMExpert

NATIVE_NORM = {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}


class FreshRequestStepper:
    """Variant (a): the session is a token list kept here; every step is a new max_tokens=1 request."""

    def __init__(self, engine, top_k: int) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self.engine = engine
        self.top_k = top_k
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, detokenize=False,
                                     ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
        self.tokens: dict[str, list[int]] = {}
        self.n = 0

    async def step(self, steps: list[SessionStep]) -> list[TopK]:
        for s in steps:
            self.tokens.setdefault(s.session_id, []).extend(s.token_ids)
        return list(await asyncio.gather(*(self._one(self.tokens[s.session_id]) for s in steps)))

    async def _one(self, tokens: list[int]) -> TopK:
        from vllm.inputs import TokensPrompt

        self.n += 1
        out = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(tokens)), self.params,
                                              f"fresh#{self.n}"):
            pass
        return _topk(out.outputs[0].logprobs[-1], self.top_k)


async def run_streaming(expert: VLLMExpert, prompts, feeds, top_k: int):
    ids = [f"s{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    first = await expert.open([SessionStep(i, tuple(p)) for i, p in zip(ids, prompts)], top_k)
    outs, times = [[o.topk for o in first]], []
    engine = getattr(expert, "engine", None)
    steps0 = getattr(engine, "steps", None)
    cpu0 = time.process_time()
    for t in range(len(feeds[0])):
        t0 = time.perf_counter()
        res = await expert.advance([SessionStep(i, (f[t],)) for i, f in zip(ids, feeds)], top_k)
        times.append(time.perf_counter() - t0)
        assert all(r.error is None for r in res), [r.error for r in res if r.error]
        outs.append([r.topk for r in res])
    cpu = time.process_time() - cpu0
    if steps0 is not None:       # in-process engine: one batched advance should be one engine step
        print(f"    engine steps per advance: {(engine.steps - steps0) / len(feeds[0]):.2f}")
    await expert.close(ids)
    return outs, times, cpu


async def run_fresh(stepper: FreshRequestStepper, prompts, feeds):
    ids = [f"f{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    outs, times = [await stepper.step([SessionStep(i, tuple(p)) for i, p in zip(ids, prompts)])], []
    cpu0 = time.process_time()
    for t in range(len(feeds[0])):
        t0 = time.perf_counter()
        outs.append(await stepper.step([SessionStep(i, (f[t],)) for i, f in zip(ids, feeds)]))
        times.append(time.perf_counter() - t0)
    return outs, times, time.process_time() - cpu0


async def run_plain_decode(engine, prompts, steps: int, top_k: int) -> tuple[list[float], float]:
    """(c) the reference: vLLM decoding on its own (one request per stream, max_tokens=steps, same top-k
    logprobs), inter-token times pooled over the streams: what one engine step costs without sessions.
    -> (times, CPU seconds of the whole run, prefill included)."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, logprobs=top_k, detokenize=False,
                            ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int, prompt) -> list[float]:
        arrivals = []
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=list(prompt)), params,
                                       f"plain{i}-{time.monotonic_ns()}"):
            arrivals.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(arrivals)]

    cpu0 = time.process_time()
    times = [d for ds in await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))) for d in ds]
    return times, time.process_time() - cpu0


def max_diff(a, b) -> tuple[float, int]:
    """Largest |logprob| gap over shared top-k ids, and how many positions' top-1 ids differ."""
    worst, top1 = 0.0, 0
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            common = dict(zip(y.token_ids, y.logprobs))
            worst = max([worst] + [abs(lp - common[t]) for t, lp in zip(x.token_ids, x.logprobs) if t in common])
            top1 += x.token_ids[0] != y.token_ids[0]
    return worst, top1


def report(name: str, streams: int, times: list[float], cpu_s: float | None = None, steps: int = 0) -> None:
    """times: one per step of all streams, or inter-token times of every stream pooled (the same rate).
    cpu_s: CPU seconds of this process (every thread) over `steps` engine steps: on a busy machine the CPU a
    step costs, not its wall time, is what the other processes lose (a second idle core hides it here)."""
    ms = statistics.median(times) * 1e3
    tps = streams * len(times) / sum(times)
    cpu = f"  CPU {1e3 * cpu_s / steps:7.2f} ms/step" if cpu_s is not None and steps else ""
    print(f"{name:<22} streams={streams:>3}  median {ms:7.2f} ms/step  mean {1e3 * statistics.mean(times):7.2f}"
          f" ms/step  {tps:8.1f} tokens/s{cpu}")


def probe_config(args) -> ExpertConfig:
    return ExpertConfig(name="probe", model_path=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=max(64, 2 * max(args.streams)), kv_cache_space_gib=1,
                        cpu_threads_bind=args.cpu_threads_bind, engine_process=args.engine_process,
                        cpu_threads=args.cpu_threads, enforce_eager=args.enforce_eager,
                        engine_kwargs={"ir_op_priority": NATIVE_NORM} if args.native_norm else {})


def workload(rng: random.Random, vocab: int, streams: int, args):
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(streams)]
    feeds = [[rng.randrange(vocab) for _ in range(args.steps)] for _ in range(streams)]
    return prompts, feeds


async def measure_via_serve(args) -> None:
    """Variant (b) through Ray Serve: ServeExpertClient -> ExpertServer replica, one RPC per batched step."""
    import ray
    from ray import serve

    from experts.server import run_experts

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    try:
        client = (await asyncio.to_thread(run_experts, [probe_config(args)]))["probe"]
        vocab, rng = (await client.info()).vocab_size, random.Random(0)
        for streams in args.streams:
            prompts, feeds = workload(rng, vocab, streams, args)
            for _ in range(2 if args.warmup else 1):
                _, times, _ = await run_streaming(client, prompts, feeds, args.top_k)
            report("(b) via Ray Serve", streams, times)
    finally:
        serve.shutdown()
        ray.shutdown()


async def measure(args) -> None:
    if args.via_serve:
        return await measure_via_serve(args)
    expert = VLLMExpert(probe_config(args))
    info = await expert.info()
    rng = random.Random(0)
    stepper = FreshRequestStepper(expert.engine, args.top_k)
    try:
        for streams in args.streams:
            prompts, feeds = workload(rng, info.vocab_size, streams, args)
            for _ in range(2 if args.warmup else 1):  # first round warms both paths up; keep the last
                if "b" in args.variants:
                    s_out, s_times, s_cpu = await run_streaming(expert, prompts, feeds, args.top_k)
                if "a" in args.variants:
                    f_out, f_times, f_cpu = await run_fresh(stepper, prompts, feeds)
                if "c" in args.variants:
                    p_times, p_cpu = await run_plain_decode(expert.engine, prompts, len(feeds[0]), args.top_k)
            n = len(feeds[0])
            if "a" in args.variants:
                report("(a) fresh request", streams, f_times, f_cpu, n)
            if "b" in args.variants:
                report("(b) streaming session", streams, s_times, s_cpu, n)
            if "c" in args.variants:
                report("(c) plain vLLM decode", streams, p_times, p_cpu, n + 1)
            if "a" in args.variants and "b" in args.variants:
                worst, top1 = max_diff(s_out, f_out)
                print(f"    agreement (a) vs (b): max |dlogprob| {worst:.2e}, top-1 differs at {top1} positions")
    finally:
        stepper.engine = None
        expert.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/demo/experts/code", help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--cpu-threads-bind", default="auto", help="cores of the engine (ExpertConfig.cpu_threads_bind)")
    p.add_argument("--engine-process", default="auto", choices=["auto", "inproc", "separate"],
                   help="vLLM's engine in this process or in its own (ExpertConfig.engine_process)")
    p.add_argument("--via-serve", action="store_true", help="measure (b) through a Ray Serve deployment instead")
    p.add_argument("--variants", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"],
                   help="which of (a) fresh request, (b) streaming session, (c) plain decode to run")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of the engine (ExpertConfig.cpu_threads)")
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile the model (torch.compile: ~35 s more start-up the first time, one demo "
                        "expert)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--native-norm", action="store_true",
                   help="RMSNorm by vLLM's native op chain (its CPU default) instead of its C++ kernels "
                        "(experts/cpu_norm.py)")
    asyncio.run(measure(p.parse_args()))


if __name__ == "__main__":
    main()
