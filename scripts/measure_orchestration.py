"""CPU the gateway's decode loop spends per generated token, with experts that answer instantly.

The experts here are in-process stand-ins that return a precomputed top-k at once, so everything measured
is the orchestrator's own work per round: route (gate), mix, sample, feed back (events, gate step), and the
asyncio plumbing between them. The served gate (DEMO/gate) and the demo tokenizer's vocabulary are used.
One line per concurrency: µs of CPU per token in all, and per phase (orchestrator/profile.py).

    .venv/bin/python scripts/measure_orchestration.py --streams 1 8 32 [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def topk_pool(vocab: int, top_k: int, seed: int, size: int = 64) -> list:
    """`size` precomputed top-k answers (TopK), each holding 90 % of the mass: what a real expert answers."""
    from experts.protocol import TopK

    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        ids = rng.sample(range(2, vocab), top_k)
        raw = sorted((-rng.random() * 6 - 0.5 for _ in range(top_k)), reverse=True)
        shift = math.log(0.9) - math.log(sum(math.exp(v) for v in raw))
        pool.append(TopK.of(tuple(ids), tuple(v + shift for v in raw)))
    return pool


class InstantExpert:
    """Answers every open/advance at once with one of a few precomputed top-k."""

    def __init__(self, name: str, vocab: int, top_k: int, seed: int) -> None:
        self.name, self.vocab = name, vocab
        self.pool = topk_pool(vocab, top_k, seed)
        self.n = 0
        self.lengths: dict[str, int] = {}       # session -> tokens it holds (the gateway checks each answer's)

    async def info(self):
        from experts.protocol import ExpertInfo

        return ExpertInfo(self.name, f"/instant/{self.name}", self.vocab, 4096, "fp-shared", 0)

    def _answer(self, steps, opening: bool):
        from experts.protocol import StepOutput

        out = []
        for s in steps:
            self.n += 1
            held = self.lengths[s.session_id] = (0 if opening else self.lengths[s.session_id]) + len(s.token_ids)
            out.append(StepOutput(s.session_id, topk=self.pool[self.n % len(self.pool)], length=held))
        return out

    async def open(self, steps, top_k):
        return self._answer(steps, opening=True)

    async def advance(self, steps, top_k):
        return self._answer(steps, opening=False)

    async def close(self, session_ids):
        for sid in session_ids:
            self.lengths.pop(sid, None)


async def run(streams: int, tokens: int, demo: Path) -> dict:
    return await measure(lambda names, vocab: {n: InstantExpert(n, vocab, 20, i) for i, n in enumerate(names)},
                         streams, tokens, demo)


async def measure(make_experts: Callable[[list[str], int], dict], streams: int, tokens: int, demo: Path) -> dict:
    """The served gate over make_experts(expert names, vocab size): one warm-up pass of `streams` requests of
    `tokens` tokens, then one timed -> CPU and wall per token of this process, and the phases."""
    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.runtime import GateRuntime
    from orchestrator.engine import EnsembleEngine
    from orchestrator.types import GenerationParams, GenerationRequest

    ckpt = load_checkpoint(resolve_gate_path(demo / "gate"))
    vocab = ckpt.args.vocab_size
    experts = make_experts(list(ckpt.expert_names), vocab)
    engine = EnsembleEngine(experts, GateRuntime.from_checkpoint(ckpt), top_k=2)
    await engine.start()
    rng = random.Random(0)

    async def one(i: int) -> int:
        prompt = tuple(rng.randrange(2, vocab) for _ in range(100))
        req = GenerationRequest(f"r{i}", prompt, model="ensemble",
                                params=GenerationParams(max_tokens=tokens, temperature=0.8, ignore_eos=True))
        return sum([1 async for _ in engine.generate(req)])

    await asyncio.gather(*(one(i) for i in range(streams)))              # warm-up (connections, pins)
    engine.clock.seconds.clear()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    n = sum(await asyncio.gather(*(one(i) for i in range(streams))))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    phases = {k: round(1e6 * v / n, 1) for k, v in sorted(engine.clock.seconds.items())}
    await engine.stop()
    return {"streams": streams, "tokens": n, "cpu_us_per_token": round(1e6 * cpu / n, 1),
            "wall_us_per_token": round(1e6 * wall / n, 1), "phases_us_per_token": phases}


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "artifacts/demo")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--profile", type=Path, help="write a cProfile of the runs here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    for s in args.streams:
        print(json.dumps(asyncio.run(run(s, args.tokens, args.demo))), flush=True)
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
