"""`ensemble keys add|list|revoke`: manage API keys in the service's store (--store URL, else the config's).

`add` prints the key once (with --json: {"name", "key", ...}); the store keeps only its salted digest.
Gateways pick up changes within ~2 s, without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL", help="store URL (sqlite:///FILE or postgresql://...); default: "
                   "ENSEMBLE_STORE_URL, else traffic_log.url of --config")
    p.add_argument("--config", type=Path, default=None, help="deploy config (default: deploy/local.yaml)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create a key and print it (once)")
    add.add_argument("name")
    add.add_argument("--scope", choices=("user", "admin"), default="user")
    add.add_argument("--rpm", type=int, help="generation requests per minute (default: unlimited)")
    add.add_argument("--tpm", type=int, help="prompt + completion tokens per minute (default: unlimited)")
    add.add_argument("--max-streams", type=int, help="generation requests in flight at once (default: unlimited)")
    add.add_argument("--json", action="store_true", help="print one JSON object with name and key")
    ls = sub.add_parser("list", help="list keys (names, scopes, limits; never the keys)")
    ls.add_argument("--json", action="store_true")
    rv = sub.add_parser("revoke", help="revoke a key (live on every gateway within a few seconds)")
    rv.add_argument("name")
    rv.add_argument("--json", action="store_true")
    # Let --store/--config also follow the action (`ensemble keys add NAME --store URL`).
    for s in (add, ls, rv):
        s.add_argument("--store", metavar="URL", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        s.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def store_url(args) -> str:
    if args.store:
        return args.store
    from deploy.config import load_config  # the CLI may read the service's config; the library never does

    return load_config(args.config).app.traffic_log.database_url()


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def run(args) -> int:
    from orchestrator.keys.records import KeySpecError
    from orchestrator.keys.store import KeyStore
    from orchestrator.store import StoreError

    try:
        store = KeyStore(store_url(args))
    except (StoreError, ValueError) as exc:
        print(f"ensemble keys: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            key, token = store.add(args.name, args.scope, rpm=args.rpm, tpm=args.tpm, max_streams=args.max_streams)
            if args.json:
                print(json.dumps({**key.public(), "key": token}))
            else:
                print(token)
                print(f"created {args.scope} key {key.name!r} in {store.url}; this is the only time the key is "
                      "shown", file=sys.stderr)
        elif args.action == "list":
            keys = store.list()
            if args.json:
                print(json.dumps([k.public() for k in keys]))
            else:
                print(f"{'NAME':24} {'SCOPE':6} {'RPM':>7} {'TPM':>9} {'STREAMS':>7}  {'CREATED':20}  REVOKED")
                for k in keys:
                    lim = lambda v: "-" if v is None else str(v)
                    print(f"{k.name:24} {k.scope:6} {lim(k.rpm):>7} {lim(k.tpm):>9} {lim(k.max_streams):>7}  "
                          f"{_when(k.created):20}  {_when(k.revoked)}")
        else:
            key = store.revoke(args.name)
            print(json.dumps(key.public()) if args.json else f"revoked {key.name!r}")
    except KeySpecError as exc:
        print(f"ensemble keys: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
