"""`ensemble serve --config deploy/local.yaml [--host H --port P]`: start Ray, Serve and the application.

Blocks until Ctrl-C or SIGTERM, then stops cleanly: Serve drains the gateway (in-flight requests finish, the
traffic log is flushed), the experts' engines stop, and a Ray this command started is shut down too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from deploy.config import DEFAULT_CONFIG, ConfigError, DeployConfig, load_config


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, so the same cleanup runs as for Ctrl-C."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="deploy YAML (default: %(default)s)")
    parser.add_argument("--host", default=None, help="HTTP host (overrides http_options.host)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (overrides http_options.port)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")


def apply_overrides(config: DeployConfig, args: argparse.Namespace) -> DeployConfig:
    http = config.http_options.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port))
                                                  if v is not None})
    ray_init = config.ray_init
    if args.address:
        ray_init = ray_init.model_copy(update={"address": args.address, "num_cpus": None, "num_gpus": None})
    return config.model_copy(update={"http_options": http, "ray_init": ray_init})


def run(args: argparse.Namespace) -> int:
    try:
        config = apply_overrides(load_config(args.config), args)
        missing = [] if config.ray_init.address else config.app.missing_local_paths()
        if missing:
            raise ConfigError(f"{args.config}: cannot start locally\n  " + "\n  ".join(missing))
    except ConfigError as exc:
        print(f"ensemble serve: {exc}", file=sys.stderr)
        return 2
    return serve_forever(config)


EARLIER_SERVICE_WAIT_S = 180.0


def psutil_wait(procs: list) -> list:
    """Wait (bounded) for procs to exit -> those that did."""
    import psutil

    gone, _ = psutil.wait_procs(procs, timeout=EARLIER_SERVICE_WAIT_S)
    return gone


def serve_forever(config: DeployConfig) -> int:
    import ray
    from ray import serve

    from deploy.app import deploy

    started_ray = not config.ray_init.address
    # The first SIGINT/SIGTERM stops the service; later ones are ignored so the cleanup runs to its end. Set
    # before Ray starts, and also when started in the background by a shell that leaves SIGINT ignored.
    on_signal = _FirstSignalStops()
    previous = signal.signal(signal.SIGTERM, on_signal)
    previous_int = signal.signal(signal.SIGINT, on_signal)
    if started_ray:
        from deploy.orphans import earlier_services, reap_orphan_engines

        # A service stopped just before this start may still be draining and stopping its engines: starting
        # beside it would need twice the memory. Wait for it; refuse if it does not stop.
        if earlier := earlier_services():
            pids = ", ".join(str(p.pid) for p in earlier)
            print(f"waiting up to {EARLIER_SERVICE_WAIT_S:.0f} s for the earlier `ensemble serve` (pid {pids}) "
                  "to stop ...", flush=True)
            gone = psutil_wait(earlier)
            if still := [p for p in earlier if p not in gone]:
                print(f"ensemble serve: another local service is running (pid {', '.join(str(p.pid) for p in still)});"
                      " stop it first (Ctrl-C, or kill -TERM <pid>)", file=sys.stderr)
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
                return 1
        if reaped := reap_orphan_engines():
            print(f"reaped {reaped} vLLM engine / Serve HAProxy process(es) an earlier run left without a parent",
                  flush=True)
        from deploy.orphans import wait_port_free

        host = config.http_options.host if config.http_options.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if holder := wait_port_free(host, config.http_options.port):
            print(f"ensemble serve: port {config.http_options.port} is in use by {holder}; stop it or pass --port",
                  file=sys.stderr)
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
            return 1
    started_at = time.time()
    print(f"starting Ray ({config.ray_init.address or 'local'}) ...", flush=True)
    try:
        ray.init(**config.ray_init.init_kwargs())
    except (Exception, _Stop) as exc:  # noqa: BLE001 - e.g. no cluster at `address`, or a stop during start
        print(f"ensemble serve: could not start or join Ray: {type(exc).__name__}: {exc}", file=sys.stderr)
        if ray.is_initialized():
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        return 1
    # ray.init installs Ray's own C-level SIGTERM handler in this process (it prints a stack trace and kills
    # the process, so nothing drains): ours must be the one that runs.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        names = ", ".join(e.name for e in config.app.experts)
        print(f"deploying gateway + {len(config.app.experts)} experts ({names}); engines take ~30-60 s ...",
              flush=True)
        t0 = time.time()
        deploy(config)
        print(f"\nensemble gateway ready in {time.time() - t0:.0f} s at {config.url}/v1\n"
              f"  models:      ensemble, {names}\n"
              f"  traffic log: {config.app.traffic_log.path}\n"
              f"  try:         curl {config.url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"ensemble\", \"prompt\": \"def fib(n):\", \"max_tokens\": 32}}'\n"
              f"  stop:        Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        print("\nshutting down: draining requests and flushing the traffic log ...", flush=True)
    except Exception as exc:  # noqa: BLE001 - deployment failed: say why, still clean up
        print(f"ensemble serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        on_signal.fired = True                              # a second signal must not cut the cleanup short
        try:
            # Drain unless the deploy failed; also when the stop came while deploy() still waited for RUNNING:
            # the gateway may already be answering then (its /health is up before Serve's status says RUNNING).
            stop(config, drain_first=code == 0)
            if started_ray:
                serve.shutdown()                            # a shared cluster's Serve is left running
        finally:
            if started_ray:
                ray.shutdown()
                from deploy.orphans import reap_after_stop

                reap_after_stop(started_at)                 # Serve's HAProxy outlives its manager otherwise
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    print("stopped.", flush=True)
    return code


def stop(config: DeployConfig, drain_first: bool) -> None:
    """Stop the app without cutting a stream: first every gateway replica finishes its in-flight requests
    (a user_config-only update, so nothing restarts), then `serve.delete` stops the replicas (the
    gateway's __del__ flushes the traffic log) while the HTTP proxy is still up."""
    from ray import serve

    from deploy.app import deploy

    app_name, timeout_s = config.applications[0].name, config.app.gateway.graceful_shutdown_timeout_s + 30
    if app_name not in serve.status().applications:     # stopped before the deploy began: nothing to stop
        return
    if drain_first:
        try:
            deploy(config, gateway_user_config=config.app.gateway_user_config(draining=True), timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - still delete the app below
            print(f"warning: could not drain the gateway first ({type(exc).__name__}: {exc})", file=sys.stderr)
    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            print(f"warning: {app_name!r} still draining after {timeout_s:.0f} s; stopping anyway "
                  "(unfinished requests stay in the traffic log marked incomplete)", file=sys.stderr)
            return
        time.sleep(0.5)


class _FirstSignalStops:
    """Signal handler: raise _Stop in the main thread on the first signal, ignore the ones after it."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum, frame) -> None:
        if not self.fired:
            self.fired = True
            raise _Stop()
