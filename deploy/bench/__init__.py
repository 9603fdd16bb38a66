"""`ensemble bench`: what users get over HTTP, side by side with vLLM's own OpenAI server, in one run.

It starts vLLM's OpenAI server on one expert (same engine settings as our replicas) and our service (or uses
a running one, `--url`), then drives both with one load generator: streaming /v1/completions, the same
prompts from held-out demo text, the same sampling parameters and a fixed max_tokens. For each concurrency
level the configurations run in ABBA order, so drift on the machine hits both sides:

    vllm             vLLM alone, model=<expert>
    gateway_single   our gateway, model=<expert> (one expert, no mixing)
    ensemble_top1    our gateway, model=ensemble, experts_per_token=1
    ensemble_top2    our gateway, model=ensemble, experts_per_token=2

Each server runs in a session of its own; where Linux's autogroup scheduling is on, both sessions get the same
group niceness (--server-group-nice, 15), so that neither server can starve the load generator that measures it
(README "Speed").

It prints throughput, TTFT and ITL (p50/p99), errors, the ratios to vLLM alone, our per-token wall time by
phase (scraped from /metrics), the peak resident memory of each whole service, and writes a PNG of throughput
against concurrency. Benchmarks are separate from tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deploy.bench import load, phases, report
from deploy.bench.load import Target
from deploy.config import DEFAULT_CONFIG, PROJECT_ROOT, load_config

TARGETS = report.ORDER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="our service's deploy YAML (default: %(default)s)")
    p.add_argument("--url", help="bench an already running gateway at this base URL instead of starting one")
    p.add_argument("--expert", help="the expert vLLM serves alone and gateway_single asks for (default: the first)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default: %(default)s)")
    p.add_argument("--requests-per-stream", type=int, default=3,
                   help="requests per level = max(8, this x concurrency) (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds per level (default: %(default)s)")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of: " + ", ".join(TARGETS))
    p.add_argument("--prompts", type=Path, default=PROJECT_ROOT / "artifacts/demo/data/eval/heldout_all.jsonl",
                   help="JSONL with a text field; prompts are the first --prompt-chars of each document")
    p.add_argument("--prompt-chars", type=int, default=400)
    p.add_argument("--plot", type=Path, default=Path("bench.png"), help="throughput PNG (default: %(default)s)")
    p.add_argument("--logs", type=Path, default=Path("artifacts/bench-logs"), help="server logs go here")
    p.add_argument("--baseline-nice", type=int, default=ray_worker_niceness(),
                   help="scheduling niceness of vLLM's server processes: the niceness Ray gives its workers "
                        "(RAY_worker_niceness, 15 unless set). Where autogroup scheduling is on it counts only "
                        "inside vLLM's own session; --server-group-nice is what weighs against the load generator "
                        "(default: %(default)s)")
    p.add_argument("--baseline-cpu-bind", default="expert",
                   help="CPU only: the cores vLLM's server computes on, one thread each. 'expert' (default): the "
                        "expert's own cpu_threads_bind and cpu_threads, our replicas' placement, which is also vLLM "
                        "alone's fastest here once the load generator is not starved (c=32: 3090.3 and 2916.2 "
                        "tok/s against 2871.8 and 2905.4 pinned to core 0, alternating runs); or core ids such as "
                        "'0' (default: %(default)s)")
    p.add_argument("--server-group-nice", type=int, default=15,
                   help="Linux autogroup niceness of both servers' sessions, vLLM's and ours alike (where autogroup "
                        "scheduling is on, as on this machine, niceness counts only inside a session and each "
                        "session weighs as much as the load generator's; at 15 the load generator gets a core when "
                        "it needs one and measures the servers, not its own wait; -1: leave them at 0) "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def ray_worker_niceness() -> int:
    """The niceness Ray starts worker processes (our Serve replicas) with: Ray's default 15, or RAY_worker_niceness."""
    import os

    try:
        return int(os.environ.get("RAY_worker_niceness", "15"))
    except ValueError:
        return 15


def read_prompts(path: Path, chars: int, n: int = 256) -> list[str]:
    prompts = []
    with open(path) as f:
        for line in f:
            text = json.loads(line).get("text", "").strip()
            if len(text) >= chars // 2:
                prompts.append(text[:chars])
            if len(prompts) >= n:
                break
    if not prompts:
        raise SystemExit(f"ensemble bench: no prompts in {path}")
    return prompts


def targets(names: list[str], vllm_url: str | None, ours_url: str | None, expert: str) -> list[Target]:
    make = {
        "vllm": lambda: Target("vllm", vllm_url, expert),
        "gateway_single": lambda: Target("gateway_single", ours_url, expert),
        "ensemble_top1": lambda: Target("ensemble_top1", ours_url, "ensemble", {"experts_per_token": 1}),
        "ensemble_top2": lambda: Target("ensemble_top2", ours_url, "ensemble", {"experts_per_token": 2}),
    }
    return [make[n]() for n in names]


async def measure(all_targets: list[Target], prompts: list[str], args, ours_url: str | None,
                  focus: Callable[[str], None] = lambda url: None) -> tuple[list, list]:
    """`focus(base_url)` runs before each target's load: it lets the servers' scheduling groups favour the one
    being measured (servers.focus_groups)."""
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list] = {}
    breakdown: dict[tuple[str, int], dict[str, float]] = {}
    shares: dict[tuple[str, int], list[float | None]] = {}      # each round's own orchestration share
    for c in levels:
        n = max(8, args.requests_per_stream * c)
        # Warm-up at this concurrency, not measured: the first batch of a new size costs the CPU engines
        # seconds (seen on both sides), and connection pools fill.
        for t in all_targets:
            focus(t.base_url)
            await load.run_level(t, prompts, c, c, 8, args.temperature)
        for r in range(args.rounds):
            order = all_targets if r % 2 == 0 else list(reversed(all_targets))
            for t in order:
                focus(t.base_url)
                before = await phases.scrape(ours_url) if t.base_url == ours_url else None
                res = await load.run_level(t, prompts, c, n, args.max_tokens, args.temperature)
                runs.setdefault((t.name, c), []).append(res)
                if before is not None:
                    after = await phases.scrape(ours_url)
                    acc = breakdown.setdefault((t.name, c), {})
                    this_round = phases.delta(before, after)
                    for k, v in this_round.items():
                        acc[k] = acc.get(k, 0.0) + v
                    shares.setdefault((t.name, c), []).append(phases.share_of(this_round))
                _progress(f"c={c} round {r + 1}/{args.rounds} {t.name}: {load.summarise([res])['tokens_per_s']} tok/s")
    rows = [load.summarise(v) for v in runs.values()]
    return rows, [phases.per_token(name, c, d, shares.get((name, c))) for (name, c), d in breakdown.items()]


def run(args) -> int:
    config = load_config(args.config)
    experts = {e.name: e for e in config.app.experts}
    expert = experts.get(args.expert or config.app.experts[0].name)
    if expert is None:
        print(f"ensemble bench: no expert {args.expert!r} in {args.config}; have {', '.join(experts)}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"ensemble bench: unknown targets {unknown}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    prompts = read_prompts(args.prompts, args.prompt_chars)
    from deploy.bench.memory import PeakRSS
    from deploy.bench.servers import autogroups_on, ensemble_server, focus_groups, vllm_server

    t0 = time.time()
    memory: dict[str, float] = {}
    group_nice = args.server_group_nice if args.server_group_nice >= 0 and autogroups_on() else None
    if args.url and group_nice is not None:
        _progress(f"--url: the running service's session keeps the scheduling group it was started with; "
                  f"vLLM's gets niceness {group_nice} (compare like with like: set the service's too, "
                  f"`echo {group_nice} > /proc/<pid of ensemble serve>/autogroup`)")
    with contextlib.ExitStack() as stack:
        ours_url = args.url
        ours_mem = ours_pid = vllm_pid = None
        if ours_url is None and any(n != "vllm" for n in names):
            _progress(f"starting our service ({args.config}) ...")
            ours = stack.enter_context(ensemble_server(args.config, args.logs / "ensemble.log", group_nice=group_nice))
            ours_url, ours_mem, ours_pid = ours.base_url, stack.enter_context(PeakRSS(ours.pid)), ours.pid
        vllm_url, vllm_mem = None, None
        if "vllm" in names:
            _progress(f"starting vLLM's OpenAI server on expert {expert.name} ...")
            base = stack.enter_context(vllm_server(expert, args.logs / "vllm.log", nice=args.baseline_nice,
                                                   cpu_bind=None if args.baseline_cpu_bind == "expert"
                                                   else args.baseline_cpu_bind, group_nice=group_nice))
            vllm_url, vllm_mem, vllm_pid = base.base_url, stack.enter_context(PeakRSS(base.pid)), base.pid
        groups = {url: pid for url, pid in ((ours_url, ours_pid), (vllm_url, vllm_pid)) if pid is not None}
        rows, breakdown = asyncio.run(measure(targets(names, vllm_url, ours_url, expert.name), prompts, args, ours_url,
                                              focus=focus_groups(groups, group_nice)))
        for name, mem in (("ensemble", ours_mem), ("vllm", vllm_mem)):
            if mem is not None:
                memory[name] = round(max(mem.peak, mem.sample()) / 2**30, 2)
    result = {"expert": expert.name, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "baseline_nice": args.baseline_nice, "baseline_cpu_bind": args.baseline_cpu_bind,
              "server_group_nice": group_nice,
              "rows": rows, "ratios": report.ratios(rows), "phases_us_per_token": breakdown,
              "peak_rss_gib": memory, "seconds": round(time.time() - t0, 1)}
    if args.plot:
        report.plot(rows, args.plot)
    if args.json:
        print(json.dumps(result))
        return 0
    print(report.format_table(rows))
    print()
    print(report.format_phases(breakdown))
    work = report.format_work(breakdown)
    if work:
        print()
        print(work)
    print("\nratios to vLLM alone:", json.dumps(result["ratios"]))
    print("peak resident memory (GiB, sum of RSS over each service's processes):", json.dumps(memory))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
