"""`ensemble gate-history`: list gate versions and which is live, or restore an earlier one in one command.

`--restore` moves the registry's CURRENT pointer and, when the service of `--config` is running, swaps the
live gateway to that version in place (the same Serve user_config update `ensemble retrain` uses). The
registry is a directory or a database URL (sqlite:///FILE, postgresql://...); both behave the same.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("deploy/local.yaml"), help="the service's deploy YAML")
    p.add_argument("--registry", help="gate registry: a directory or a database URL (default: the config's "
                   "gate.path; a database there yields to ENSEMBLE_STORE_URL)")
    p.add_argument("--restore", metavar="VERSION", help="make VERSION the live gate (registry and running service)")
    p.add_argument("--no-swap", action="store_true", help="--restore: only move the registry pointer")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from gating.checkpoint import open_registry

    config = None
    if args.registry is None or (args.restore and not args.no_swap):
        from deploy.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as err:
            print(f"ensemble gate-history: {err}", file=sys.stderr)
            return 2
        if args.registry is None and config.app.gate is None:
            print(f"ensemble gate-history: {args.config} configures no gate; pass --registry", file=sys.stderr)
            return 2
    reg = open_registry(args.registry or config.app.gate.location())
    if args.restore:
        try:
            reg.set_current(args.restore, reason="restored by gate-history --restore")
        except FileNotFoundError as err:
            print(f"ensemble gate-history: {err}", file=sys.stderr)
            return 2
        print(f"registry {reg.location}: CURRENT is now {args.restore}")
        if config is not None:
            from deploy.retrain_job import swap_if_running
            from orchestrator.cli import stdout_to_stderr

            with stdout_to_stderr():
                # The location as configured (or given): a resolved ENSEMBLE_STORE_URL stays out of Serve's config.
                swapped = swap_if_running(config, args.registry or config.app.gate.path, args.restore)
            print(f"the running service now serves {args.restore}" if swapped
                  else "no running service found; it will load this version when started")
        return 0
    live = reg.current()
    rows = []
    for v in reg.versions():
        c = reg.load(v)
        rows.append({"version": v, "live": v == live, "parent": c.parent, "created": c.created,
                     "experts": c.expert_names, "top_k": c.top_k, "mix": c.mix_space, "metrics": c.metrics})
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no gate versions in {reg.location}")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M")
        nll = r["metrics"].get("val_nll") or r["metrics"].get("heldout_nll_new")
        print(f"{'*' if r['live'] else ' '} {r['version']:<10} {when}  parent={r['parent'] or '-':<10} "
              f"k={r['top_k']} mix={r['mix']}" + (f"  nll={nll:.4f}" if nll else ""))
    return 0
