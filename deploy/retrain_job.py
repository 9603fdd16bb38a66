"""`ensemble retrain`: fit a new gate on logged traffic, promote it only if it beats the live one on
held-out requests, and swap it into the running service through Serve's user_config (no restart).

The same command runs locally and as a Ray job on a cluster (`ray job submit -- ensemble retrain ...`).
Interrupting it, or any error, leaves the live gate version untouched and writes no checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("deploy/local.yaml"), help="the service's deploy YAML")
    p.add_argument("--store", metavar="URL", help="traffic store URL (sqlite:///FILE or postgresql://...); "
                   "default: ENSEMBLE_STORE_URL, else traffic_log.url of --config")
    p.add_argument("--log", type=Path, nargs="*", help="SQLite traffic log file(s), e.g. older per-replica files")
    p.add_argument("--parquet", type=Path, help="read an `ensemble export-log` directory instead of the store")
    p.add_argument("--ray-data", action="store_true",
                   help="large logs: read the Parquet partitions and score with Ray Data across the cluster")
    p.add_argument("--since", type=float, help="only requests created at/after this unix time")
    p.add_argument("--until", type=float, help="only requests created before this unix time")
    p.add_argument("--keys", type=key_names, metavar="NAME,NAME",
                   help="only traffic made with these API keys (e.g. trusted tenants); their feedback comes along")
    p.add_argument("--include-unrated-completions", action="store_true",
                   help="also train on sampled completions nobody rated (reinforces the current gate)")
    p.add_argument("--heldout", type=float, default=0.2, help="share of requests held out (default %(default)s)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="promote even if the new gate is not better")
    p.add_argument("--no-swap", action="store_true", help="promote in the registry but do not touch the service")
    p.add_argument("--report", type=Path, help="PNG: expert share per prompt cluster, before and after")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def key_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--keys needs at least one key name")
    return names


def log_stores(config, args) -> list[str | Path]:
    """The stores to read: --store and --log as given, else the config's store (ENSEMBLE_STORE_URL wins)."""
    stores: list[str | Path] = [*([args.store] if getattr(args, "store", None) else []), *(args.log or [])]
    return stores or [config.app.traffic_log.database_url()]


def read_log(config, args) -> tuple[list, list]:
    """-> (records, feedback) from the traffic store(s) or a Parquet export, deduplicated by id."""
    if args.parquet:
        import pyarrow.dataset as ds

        keys = getattr(args, "keys", None)
        keep = lambda r: ((args.since is None or r["created"] >= args.since)
                          and (args.until is None or r["created"] < args.until)
                          and (keys is None or r.get("key_name") in keys))
        if args.ray_data:       # partitions read in parallel by Ray Data tasks, rows streamed to this driver
            import ray.data

            columns = ["request_id", "created", "params", "prompt_ids", "output_ids", "routing_experts", "error",
                       *(["key_name"] if keys is not None else [])]
            rows = ray.data.read_parquet(str(args.parquet / "requests")).select_columns(columns).iter_rows()
            req = [dict(r) for r in rows if keep(r)]
        else:
            req = [r for r in ds.dataset(args.parquet / "requests", format="parquet", partitioning="hive")
                   .to_table().to_pylist() if keep(r)]
        fb_dir = args.parquet / "feedback"
        fb = ds.dataset(fb_dir, format="parquet").to_table().to_pylist() if fb_dir.exists() else []
        return [SimpleNamespace(**r) for r in req], [SimpleNamespace(**f) for f in fb]
    from orchestrator.store import iter_feedback, iter_records, redact, traffic_log_exists

    stores = log_stores(config, args)
    missing = [redact(str(s)) for s in stores if not traffic_log_exists(s)]
    if missing:
        raise FileNotFoundError(f"no traffic log at {', '.join(missing)}; serve some traffic first")
    records, feedback, seen = [], [], set()
    for store in stores:
        for r in iter_records(store, since=args.since, until=args.until, keys=getattr(args, "keys", None)):
            if r.request_id not in seen:
                seen.add(r.request_id)
                records.append(r)
        feedback += list(iter_feedback(store))
    return records, feedback


def join_ray(config, start_local: bool = True) -> None:
    """Join the cluster the service runs on (the config's address, else a running local Ray); failing that,
    start a local Ray if `start_local` (running_experts starts one itself when it has to)."""
    import ray

    if ray.is_initialized():
        return
    with contextlib.suppress(ConnectionError, RuntimeError):
        ray.init(address=config.ray_init.address or "auto", log_to_driver=False)
    if not ray.is_initialized() and start_local:
        from deploy.local_experts import ensure_ray

        ensure_ray(config.ray_init.num_cpus)


@contextlib.asynccontextmanager
async def experts_for(config):
    """The running service's expert deployments if it is up (scoring shares their engines), else fresh ones."""

    from deploy.local_experts import running_experts
    from experts.server import connect_experts

    names = [e.name for e in config.app.experts]
    if app_running(config):
        yield connect_experts(names, config.applications[0].name), True
        return
    async with running_experts(list(config.app.experts)) as clients:
        yield clients, False


def logged_fingerprint(params) -> str | None:
    """The tokenizer fingerprint a record was served with (params: a dict from SQLite, JSON text from Parquet)."""
    if isinstance(params, str):
        with contextlib.suppress(ValueError):
            params = json.loads(params)
    return params.get("tokenizer_fingerprint") if isinstance(params, dict) else None


def app_running(config) -> bool:
    """Whether the application of `config` runs on the Ray cluster this process can join."""
    import ray
    from ray import serve

    join_ray(config, start_local=False)
    return ray.is_initialized() and config.applications[0].name in serve.status().applications


def swap_if_running(config, registry_path: str, version: str) -> bool:
    """Swap the live gateway of `config` to `version` if its application is running -> whether it was.
    `registry_path` goes into Serve's config as is: pass the configured location, never a URL with a password."""
    if not app_running(config):
        return False
    swap_live_gate(config, registry_path, version)
    return True


def swap_live_gate(config, registry_path: str, version: str) -> dict:
    """Point the live gateway at `version` in place -> {"started", "finished", "replicas"} (unix times, and
    how many gateway replicas confirmed it)."""
    from deploy.app import deploy

    started = time.time()
    user_config = {"gate": {"path": registry_path, "version": version}, "draining": False}
    deploy(config, gateway_user_config=user_config, timeout_s=300)
    # A failed load keeps the old gate live (the gateway reports gate_error in /health), so check, on every
    # gateway replica Serve runs: each one reports what it serves in the shared store.
    live = wait_replicas_serve(config, version)
    return {"started": started, "finished": time.time(), "replicas": len(live)}


def wait_replicas_serve(config, version: str, timeout_s: float = 60.0) -> dict[str, dict]:
    """Until every running gateway replica reports `version` in the store -> their reports; else RetrainError."""
    from deploy.config import GATEWAY_DEPLOYMENT
    from deploy.replicas import replicas
    from gating.retrain import RetrainError
    from orchestrator.store.replica_status import replica_reports

    deadline = time.monotonic() + timeout_s
    while True:
        ids = [r.replica_id for r in replicas(config.applications[0].name, GATEWAY_DEPLOYMENT)]
        reports = replica_reports(config.app.traffic_log.database_url(), ids)
        stale = {rid: reports.get(rid, {}) for rid in ids if reports.get(rid, {}).get("gate_version") != version}
        if ids and not stale:
            return reports
        if time.monotonic() > deadline:
            errors = sorted({r.get("gate_error") for r in stale.values() if r.get("gate_error")})
            raise RetrainError(f"{version} was promoted in the registry but gateway replicas {sorted(stale)} still "
                               f"serve {sorted({r.get('gate_version') for r in stale.values()}, key=str)}"
                               + (f": {'; '.join(errors)}" if errors else "; see GET /health (gate_error)"))
        time.sleep(0.5)


async def retrain_from_log(args, config=None) -> dict:
    """The job of `ensemble retrain` -> its result. `config`: the service's DeployConfig (default: args.config)."""
    from deploy.config import load_config
    from gating.checkpoint import open_registry
    from gating.jobs import load_tokenizer
    from gating.retrain import RetrainError, RetrainOptions, build_sequences, check_log, retrain

    config = config or load_config(args.config)
    if config.app.gate is None:
        raise RetrainError(f"{args.config}: no gate configured; train one first (`ensemble train-gate`)")
    registry = open_registry(config.app.gate.location())
    opts = RetrainOptions(include_unrated_completions=args.include_unrated_completions, heldout_fraction=args.heldout,
                          epochs=args.epochs, seed=args.seed, force=args.force, top_logprobs=config.app.logprobs_k)
    if args.ray_data:
        if not args.parquet:
            raise RetrainError("--ray-data reads a Parquet export: run `ensemble export-log --out DIR`, then "
                               "pass --parquet DIR")
        join_ray(config)
    records, feedback = read_log(config, args)
    tokenizer = load_tokenizer(config.app.experts[0].model_path)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    async with experts_for(config) as (experts, live):
        info = await next(iter(experts.values())).info()
        log_fp = next((fp for r in records if (fp := logged_fingerprint(r.params))), None)
        check_log(records, list(experts), log_fp, info.tokenizer_fingerprint)
        seqs = build_sequences(records, feedback, opts, encode)
        score = None
        if args.ray_data:
            from gating.ray_data_scoring import score_with_ray_data

            app = config.applications[0].name if live else None      # offline experts are apps of their own
            score = lambda sequences: asyncio.to_thread(
                score_with_ray_data, app, list(experts), sequences, opts.top_logprobs)
        result, ckpt, corpus = await retrain(experts, info, registry, seqs, opts, score)
        if ckpt is not None and live and not args.no_swap:
            # The configured location, not the resolved one: ENSEMBLE_STORE_URL stays out of Serve's config.
            result["swap"] = await asyncio.to_thread(swap_live_gate, config, config.app.gate.path, ckpt.version)
        result["swapped_live"] = "swap" in result
        result["records_read"], result["feedback_read"] = len(records), len(feedback)
    if args.report:
        from gating.report import share_report

        share_report(corpus, registry, result, args.report)
    return result


def run(args) -> int:
    from gating.checkpoint import GateMismatchError
    from gating.retrain import RetrainError
    from orchestrator.store import StoreError

    t0 = time.time()
    try:
        from orchestrator.cli import stdout_to_stderr

        with stdout_to_stderr():
            result = asyncio.run(retrain_from_log(args))
    except KeyboardInterrupt:
        print("ensemble retrain: interrupted; no checkpoint written, the live gate is unchanged", file=sys.stderr)
        return 130
    except (RetrainError, GateMismatchError, FileNotFoundError, StoreError) as err:
        print(f"ensemble retrain: {err}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(result))
    else:
        verdict = "promoted" if result["promoted"] else "kept"
        print(f"{verdict} {result['new_version']} (was {result['old_version']}): held-out NLL/token "
              f"{result['heldout_nll_old']:.4f} -> {result['heldout_nll_new']:.4f} on {result['heldout_tokens']} "
              f"tokens; trained on {result['train_sequences']} sequences in {result['seconds']} s")
        print(f"  read {result['records_read']} logged requests and {result['feedback_read']} feedback rows")
        fmt = lambda share: "  ".join(f"{e} {v:.3f}" for e, v in share.items())
        print(f"  held-out oracle share (where the data says weight belongs): {fmt(result['heldout_oracle_share'])}")
        for which in ("old", "new"):
            r = result[f"routing_{which}"]
            print(f"  {which} gate routing share: {fmt(r['expert_share'])}  | weight on oracle expert "
                  f"{r['oracle_weight']:.3f}")
    return 0
