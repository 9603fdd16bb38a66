"""`ensemble soak`: N concurrent streaming clients (the `openai` client) against a running gateway for T minutes.

Bounded and self-stopping: each client loops (one streamed completion after another) until the time is up,
then the command waits for the traffic log to hold every request it sent. It reports requests, errors by
status code, p50/p99 latency, rows logged against requests sent (each id exactly once), and the resident
memory of every service process at the start and at the end (the process tree of `ensemble serve`, found by
`--pid` or by its command line). 429s above capacity are the expected answer, counted apart from errors.
When the config's application runs on a Ray it can join, it also samples the open sessions of every expert
replica every 2 s (peak and mean per replica: how the load spreads over replicas).

    ensemble soak --clients 64 --minutes 2            # against `make serve` on http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from deploy.bench.load import percentile
from deploy.config import DEFAULT_CONFIG, load_config

PROMPTS = ["def merge_sorted(a, b):", "The committee met on Tuesday to", "Compute 17 * 23 and explain:",
           '{"user": {"id": 42, "name":', "# Install\n\nRun the following", "Dear reader, the history of"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL (default: %(default)s)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="the served YAML, for its traffic store (default: %(default)s)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=2.0, help="how long to run (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default="ensemble")
    p.add_argument("--api-key", default="not-needed-without-keys", help="a key, once keys exist")
    p.add_argument("--pid", type=int, help="root pid of the service (default: the `ensemble serve` process)")
    p.add_argument("--no-replica-load", action="store_true",
                   help="do not join Ray to sample open sessions per expert replica during the run")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def service_pid() -> int | None:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if len(cmd) >= 2 and any(c.endswith("ensemble") for c in cmd[:2]) and "serve" in cmd[1:3]:
            return proc.info["pid"]
    return None


def memory_by_process(pid: int | None) -> dict[int, tuple[str, float]]:
    """pid -> (process name, MiB of RSS) for the tree under pid."""
    if pid is None:
        return {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = (p.name(), round(p.memory_info().rss / 2**20, 1))
        except psutil.NoSuchProcess:
            pass
    return out


async def client_loop(client, args, deadline: float, n: int, results: list) -> None:
    import openai

    i = n
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        rid, status = None, 200
        try:
            stream = await client.completions.create(model=args.model, prompt=PROMPTS[i % len(PROMPTS)],
                                                     max_tokens=args.max_tokens, stream=True, temperature=0.8)
            async for chunk in stream:
                rid = rid or chunk.id
        except openai.APIStatusError as exc:
            status = exc.status_code
            rid = exc.response.headers.get("x-ensemble-request-id")
        except openai.APIError as exc:            # connection dropped, in-band stream error
            status = f"error:{type(exc).__name__}"
        results.append((status, time.perf_counter() - t0, rid))
        i += args.clients


async def drive(args) -> list:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=300,
                                http_client=httpx.AsyncClient(limits=limits, timeout=300))
    deadline = time.monotonic() + 60 * args.minutes
    results: list = []
    progress = asyncio.get_running_loop().create_task(_progress(results, deadline))
    await asyncio.gather(*(client_loop(client, args, deadline, n, results) for n in range(args.clients)))
    progress.cancel()
    await client.close()
    return results


async def _progress(results: list, deadline: float) -> None:
    while True:
        await asyncio.sleep(10)
        left = max(0.0, deadline - time.monotonic())
        print(f"[soak] {len(results)} requests, {left:.0f} s left", file=sys.stderr, flush=True)


def logged_rows(store_url: str, ids: list[str], timeout_s: float = 60.0) -> dict[str, int]:
    """request id -> rows in the store, waiting (bounded) for the gateway's buffered writer to commit."""
    from orchestrator.store import iter_records

    wanted = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        counts: Counter = Counter(r.request_id for r in iter_records(store_url) if r.request_id in wanted and r.complete)
        if len(counts) == len(wanted) or time.monotonic() > deadline:
            return {rid: counts.get(rid, 0) for rid in wanted}
        time.sleep(1.0)


def run(args) -> int:
    config = load_config(args.config)
    pid = args.pid or service_pid()
    before = memory_by_process(pid)
    print(f"[soak] {args.clients} clients for {args.minutes} min against {args.url} "
          f"(service pid {pid}, {len(before)} processes)", file=sys.stderr, flush=True)
    sampler = None if args.no_replica_load else _replica_sampler(config)
    t0 = time.time()
    results = asyncio.run(drive(args))
    wall = time.time() - t0
    load = sampler.stop() if sampler else None
    after = memory_by_process(pid)
    statuses = Counter(str(s) for s, _, _ in results)
    ok_lat = [lat for s, lat, _ in results if s == 200]
    ids = [rid for _, _, rid in results if rid]
    rows = logged_rows(config.app.traffic_log.database_url(), ids)
    report = {
        "clients": args.clients, "minutes": args.minutes, "seconds": round(wall, 1), "requests": len(results),
        "by_status": dict(statuses),
        "errors": sum(n for s, n in statuses.items() if s not in ("200", "429")),
        "requests_per_s": round(len(ok_lat) / wall, 2),
        "latency_s_p50": _r(percentile(ok_lat, 50)), "latency_s_p99": _r(percentile(ok_lat, 99)),
        "with_request_id": len(ids), "logged_once": sum(1 for n in rows.values() if n == 1),
        "not_logged": sum(1 for n in rows.values() if n == 0), "logged_twice": sum(1 for n in rows.values() if n > 1),
        "rss_mib_start": round(sum(mb for _, mb in before.values()), 1),
        "rss_mib_end": round(sum(mb for _, mb in after.values()), 1),
        # open sessions + generations per expert replica, sampled every 2 s: {expert: {replica: peak, mean}}
        "replica_load": load if load is not None else "not sampled",
        # every process alive at the end: RSS at the start (None if it started during the run) and at the end
        "processes": {f"{name}[{pid}]": [before.get(pid, (None, None))[1], mb]
                      for pid, (name, mb) in sorted(after.items(), key=lambda kv: kv[1][0])},
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k != "processes":
                print(f"{k:>16}: {v}")
        print("  RSS MiB per service process (start -> end):")
        for name, (b, a) in report["processes"].items():
            print(f"    {name:<60} {b if b is not None else '-':>8} -> {a:>8}")
    return 0 if report["errors"] == 0 and report["not_logged"] == 0 and report["logged_twice"] == 0 else 1


def _replica_sampler(config):
    """Join the service's Ray (read-only) and sample its expert replicas; None (with a note) if it is not there."""
    from deploy.replica_load import LoadSampler
    from deploy.retrain_job import app_running

    try:
        if not app_running(config):
            print("[soak] the config's application is not running on a reachable Ray: no per-replica load",
                  file=sys.stderr)
            return None
    except Exception as exc:  # noqa: BLE001 - the soak works without Ray
        print(f"[soak] cannot join Ray ({exc}): no per-replica load", file=sys.stderr)
        return None
    return LoadSampler(config.applications[0].name, [e.name for e in config.app.experts]).start()


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
