"""`ensemble bench`: decode throughput measured side by side in one run, printed as ratios.

Rows: one expert alone through the engine (model=<expert>), the gated ensemble (top-k experts per token),
each with 1 and N concurrent streams, all on the same Serve deployments in the same process and minute.
Benchmarks are separate from tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--config", type=Path, help="accepted for symmetry with `make bench`; the demo experts are used")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams for the batched rows")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--json", action="store_true")


async def _run_streams(engine, model: str, streams: int, tokens: int, prompt: list[int]) -> dict:
    from orchestrator.types import GenerationParams, GenerationRequest

    params = GenerationParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)

    async def one(i: int) -> tuple[int, list[float]]:
        req = GenerationRequest(f"bench-{uuid.uuid4().hex[:8]}", tuple(prompt), params, model)
        stamps = []
        async for _ in engine.generate(req):
            stamps.append(time.perf_counter())
        return len(stamps), stamps

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    total = sum(n for n, _ in results)
    gaps = sorted(b - a for _, s in results for a, b in itertools.pairwise(s))
    return {"model": model, "streams": streams, "tokens": total, "seconds": round(wall, 3),
            "tokens_per_s": round(total / wall, 1), "itl_ms_p50": round(1000 * gaps[len(gaps) // 2], 2) if gaps else None}


async def bench(args) -> list[dict]:
    from deploy.local_experts import running_experts
    from gating.checkpoint import GateRegistry
    from gating.jobs import demo_expert_configs, load_tokenizer
    from gating.runtime import GateRuntime
    from orchestrator.engine import EnsembleEngine

    ckpt = GateRegistry(args.demo / "gate").load_current()
    configs = demo_expert_configs(args.demo, tuple(ckpt.expert_names))
    prompt = load_tokenizer(configs[0].model_path)("def parse(text):\n    \"\"\"Parse the text", add_special_tokens=True)["input_ids"]
    rows = []
    async with running_experts(configs) as experts:
        engine = EnsembleEngine(experts, GateRuntime.from_checkpoint(ckpt))
        await engine.start()
        await _run_streams(engine, "ensemble", 2, 8, prompt)                       # warm-up
        for streams in (1, args.streams):
            for model in (configs[0].name, "ensemble"):
                rows.append(await _run_streams(engine, model, streams, args.tokens, prompt))
        await engine.stop()
    return rows


def run(args) -> int:
    rows = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    base = {r["streams"]: r["tokens_per_s"] for r in rows if r["model"] != "ensemble"}
    print(f"{'model':<10}{'streams':>8}{'tokens/s':>10}{'ITL p50 ms':>12}{'vs one expert':>15}")
    for r in rows:
        print(f"{r['model']:<10}{r['streams']:>8}{r['tokens_per_s']:>10.1f}{r['itl_ms_p50'] or 0:>12.2f}"
              f"{r['tokens_per_s'] / base[r['streams']]:>15.2f}")
    return 0
