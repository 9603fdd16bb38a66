"""`ensemble gate-history`: list gate versions and which is live, or restore an earlier one in one command.

A running service picks up the restored version on its next reconfigure (`ensemble retrain` does this,
or redeploy with the same config); see README "Retraining".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=Path("artifacts/demo/gate"), help="gate registry (default %(default)s)")
    p.add_argument("--restore", metavar="VERSION", help="make VERSION the live gate")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from gating.checkpoint import GateRegistry, load_checkpoint

    reg = GateRegistry(args.registry)
    if args.restore:
        reg.set_current(args.restore, reason="restored by gate-history --restore")
        print(f"live gate is now {args.restore}")
        return 0
    live = reg.current()
    rows = []
    for v in reg.versions():
        c = load_checkpoint(reg.path_of(v))
        rows.append({"version": v, "live": v == live, "parent": c.parent, "created": c.created,
                     "experts": c.expert_names, "top_k": c.top_k, "mix": c.mix_space, "metrics": c.metrics})
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no gate versions in {reg.root}")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M")
        nll = r["metrics"].get("val_nll") or r["metrics"].get("heldout_nll_new")
        print(f"{'*' if r['live'] else ' '} {r['version']:<10} {when}  parent={r['parent'] or '-':<10} "
              f"k={r['top_k']} mix={r['mix']}" + (f"  nll={nll:.4f}" if nll else ""))
    return 0
