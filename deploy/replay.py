"""`ensemble replay`: send a batch of prompts to a running gateway through its REST API, like real traffic.

Two uses:
- replay your own prompts (`--data FILE.jsonl`, one {"text": ...} per line) to warm up or load-test a service;
- the retraining demonstration (`--shift devtools`): a few hundred prompts whose domain mix the demo gate was
  not tuned for, so that `ensemble retrain` has something to learn (README, "Retraining the gate").

With `--echo` it sends nothing to generate: it scores each prompt under the live gate (echo + logprobs, the
lm-eval path) and prints the negative log-likelihood per token, which is how the demonstration measures the
live service before and after a gate swap. Echo requests are logged like any other request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Demo traffic shifts: domain -> share of prompts. The demo gate was fit on the gate.jsonl splits of all four
# domains plus mixed documents, with roughly equal text per domain (see experts/demo/build.py). "devtools"
# is what a developer-tools deployment sends: only JSON payloads and source code, and no prose or math at all.
# Prompts come from the held-out splits, which neither the experts nor the gate ever saw.
SHIFTS: dict[str, dict[str, float]] = {"devtools": {"json": 0.5, "code": 0.5}}
# Held-out documents are dealt to two disjoint sets: `traffic` (what gets replayed and then logged, so it is
# what retraining learns from) and `probe` (one document in five: a fixed yardstick retraining never sees).
PROBE_EVERY = 5


@dataclass
class ReplayStats:
    requests: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    expert_tokens: Counter = field(default_factory=Counter)
    fingerprints: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    started: float = 0.0       # unix time of the first request: `ensemble retrain --since` takes it
    finished: float = 0.0

    def summary(self) -> dict:
        total = sum(self.expert_tokens.values()) or 1
        return {"requests": self.requests, "ok": self.ok, "errors": len(self.errors),
                "first_errors": self.errors[:3], "completion_tokens": self.completion_tokens,
                "expert_share": {e: round(n / total, 4) for e, n in sorted(self.expert_tokens.items())},
                "system_fingerprints": dict(self.fingerprints), "seconds": round(self.seconds, 1),
                "started": round(self.started, 3), "finished": round(self.finished, 3)}


def window(text: str, chars: int, rng: random.Random) -> str:
    """A window of about `chars` characters starting at a line boundary (prompts look like pasted text)."""
    if len(text) <= chars:
        return text
    starts = [0] + [i + 1 for i, c in enumerate(text[: len(text) - chars]) if c == "\n"]
    start = rng.choice(starts)
    return text[start:start + chars]


def shift_prompts(demo: Path, shift: str, n: int, seed: int = 0, chars: int = 360, split: str = "traffic") -> list[str]:
    """n prompts following SHIFTS[shift], from held-out documents of the demo data (`split`: traffic | probe)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; known: {', '.join(SHIFTS)}")
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for domain in SHIFTS[shift]:
        path = demo / "data" / domain / "heldout.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: build the demo first (`make demo`)")
        docs = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        keep = (lambda i: i % PROBE_EVERY == 0) if split == "probe" else (lambda i: i % PROBE_EVERY != 0)
        pools[domain] = [d for i, d in enumerate(docs) if keep(i) and d.strip()]
    domains, weights = zip(*SHIFTS[shift].items())
    return [window(rng.choice(pools[d]), chars, rng) for d in rng.choices(domains, weights, k=n)]


def read_prompts(path: Path, n: int | None) -> list[str]:
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f'{path}:{i}: expected an object with a "text" field') from None
    return prompts[:n] if n else prompts


async def _post_all(base_url: str, bodies: list[dict], concurrency: int, desc: str, handle) -> ReplayStats:
    import httpx
    from tqdm import tqdm

    stats, sem, t0 = ReplayStats(requests=len(bodies), started=time.time()), asyncio.Semaphore(concurrency), time.monotonic()
    bar = tqdm(total=len(bodies), desc=desc, unit="req", file=sys.stderr)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(body: dict) -> None:
            async with sem:
                try:
                    r = await client.post("/v1/completions", json=body)
                    data = r.json()
                    if r.status_code != 200:
                        stats.errors.append(f"{r.status_code}: {data.get('error', {}).get('message', data)}")
                    else:
                        stats.ok += 1
                        stats.fingerprints[data.get("system_fingerprint")] += 1
                        handle(stats, data)
                except (httpx.HTTPError, ValueError) as exc:
                    stats.errors.append(f"{type(exc).__name__}: {exc}")
                bar.update()

        await asyncio.gather(*(one(b) for b in bodies))
    bar.close()
    stats.seconds, stats.finished = time.monotonic() - t0, time.time()
    return stats


async def replay(base_url: str, prompts: list[str], concurrency: int = 8, max_tokens: int = 8,
                 temperature: float = 0.8, seed: int = 0, model: str = "ensemble") -> ReplayStats:
    """Generate a completion for every prompt (seeded per request); errors are counted, never raised."""
    def handle(stats: ReplayStats, data: dict) -> None:
        usage = data.get("usage") or {}
        stats.completion_tokens += usage.get("completion_tokens", 0)
        stats.expert_tokens.update(usage.get("expert_tokens") or {})

    bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": temperature,
               "seed": seed + i} for i, p in enumerate(prompts)]
    return await _post_all(base_url, bodies, concurrency, "replaying", handle)


async def echo_nll(base_url: str, prompts: list[str], concurrency: int = 8, model: str = "ensemble") -> tuple[float, int, ReplayStats]:
    """Score every prompt under the live service -> (NLL per token in nats, tokens scored, stats)."""
    total = {"nll": 0.0, "tokens": 0}

    def handle(stats: ReplayStats, data: dict) -> None:
        lps = [lp for lp in data["choices"][0]["logprobs"]["token_logprobs"] if lp is not None]
        total["nll"] -= sum(lps)
        total["tokens"] += len(lps)

    bodies = [{"model": model, "prompt": p, "max_tokens": 0, "echo": True, "logprobs": 0} for p in prompts]
    stats = await _post_all(base_url, bodies, concurrency, "scoring (echo)", handle)
    return total["nll"] / max(total["tokens"], 1), total["tokens"], stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help='JSON Lines of prompts, one {"text": ...} per line')
    src.add_argument("--shift", choices=sorted(SHIFTS), help="a demo traffic shift drawn from the demo data")
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo directory (for --shift)")
    p.add_argument("--split", choices=("traffic", "probe"), default="traffic",
                   help="--shift: replay the traffic documents or the disjoint probe documents (default traffic)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL (default %(default)s)")
    p.add_argument("-n", "--requests", type=int, default=300, help="number of prompts (default %(default)s)")
    p.add_argument("--chars", type=int, default=360, help="--shift: prompt length in characters")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--echo", action="store_true", help="score the prompts (NLL/token under the live gate) instead")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args) -> int:
    try:
        prompts = (read_prompts(args.data, args.requests) if args.data
                   else shift_prompts(args.demo, args.shift, args.requests, args.seed, args.chars, args.split))
    except (OSError, ValueError) as err:
        print(f"ensemble replay: {err}", file=sys.stderr)
        return 2
    import httpx

    try:
        httpx.get(f"{args.url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        print(f"ensemble replay: no healthy gateway at {args.url} ({err}); start one with `make serve`",
              file=sys.stderr)
        return 2
    if args.echo:
        nll, tokens, stats = asyncio.run(echo_nll(args.url, prompts, args.concurrency))
        out = {**stats.summary(), "nll_per_token": round(nll, 5), "perplexity": round(math.exp(nll), 2),
               "tokens": tokens}
    else:
        out = replay(args.url, prompts, args.concurrency, args.max_tokens, args.temperature, args.seed)
        out = asyncio.run(out).summary()
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>20}: {value}")
    return 1 if out["errors"] else 0
