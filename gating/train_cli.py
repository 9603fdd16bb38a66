"""`ensemble train-gate`: score documents with every expert (through their Serve deployments), fit the
gate and the per-document router baseline, and store the gate as a new promoted version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from gating.evaluate_cli import ENGINES_AT_ONCE  # experts scored at once (CPU memory)
from gating.jobs import DEFAULT_DOC_TOKENS, DEFAULT_TOP_K, DEMO_EXPERTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo build directory (default %(default)s)")
    p.add_argument("--data", type=Path, nargs="*", help="JSONL files with a 'text' field (default: the demo's gate split)")
    p.add_argument("--expert", action="append", default=[], metavar="NAME=PATH",
                   help="an expert checkpoint, repeatable, in routing order (default: the demo experts)")
    p.add_argument("--registry", help="gate registry: a directory or a database URL (sqlite:///FILE, "
                   "postgresql://...) (default: DEMO/gate)")
    p.add_argument("--k", type=int, default=2, help="experts per token, as served (default %(default)s)")
    # probs: with the cross-listed tail guess (gating/mix.py) the spaces are within 1 % on both held-out splits
    # (README, "Quality"); probs is marginally ahead for the observed gate. The checkpoint records it, serving follows.
    p.add_argument("--mix", choices=["logits", "probs"], default="probs",
                   help="mixing space the gate is trained for and then served in (default %(default)s)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=64, help="gate GRU hidden size (default %(default)s)")
    # observed: each step also reads what the selected experts said about the token just produced (free, sparse);
    # measured better than token-only on both held-out splits, in both spaces (README, "Quality"), for about
    # 85 s more fitting (stepped rollout: 201 s against 117 s)
    p.add_argument("--features", choices=["tokens", "observed"], default="observed",
                   help="gate inputs: token ids only, or also the selected experts' scores (default %(default)s)")
    p.add_argument("--fit-positions", type=int, default=512, help="positions per document used for fitting")
    p.add_argument("--max-docs-per-file", type=int, default=300)
    p.add_argument("--doc-tokens", type=int, default=DEFAULT_DOC_TOKENS)
    p.add_argument("--top-logprobs", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def data_files(args) -> list[Path]:
    if args.data:
        return list(args.data)
    files = [args.demo / "data" / d / "gate.jsonl" for d in (*DEMO_EXPERTS, "mixed")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"ensemble train-gate: missing {', '.join(missing)}; run `ensemble build-demo` first")
    return files


def expert_configs(args):
    from experts.config import ExpertConfig
    from gating.jobs import demo_expert_configs

    if not args.expert:
        return demo_expert_configs(args.demo)
    pairs = [e.split("=", 1) for e in args.expert]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("ensemble train-gate: --expert takes NAME=PATH")
    return [ExpertConfig(name=n, model_path=p, max_model_len=1024) for n, p in pairs]


def load_documents(files: list[Path], cap: int, seed: int) -> list[dict]:
    from gating.jobs import read_jsonl

    docs = []
    for f in files:
        part = read_jsonl([f])
        random.Random(seed).shuffle(part)
        docs += part[:cap]
    return docs


async def train(args) -> dict:
    from sklearn.model_selection import train_test_split

    from deploy.local_experts import running_experts
    from experts.tokenizer_check import tokenizer_fingerprint
    from gating.checkpoint import GateCheckpoint, open_registry
    from gating.doc_router import DocRouter
    from gating.jobs import load_tokenizer, scored, tokenize, vocab_size_of
    from gating.model import GateArgs
    from gating.scores import cache_key, load_scored, scoring_tag
    from gating.train import FitArgs, fit_gate

    t0 = time.time()
    configs = expert_configs(args)
    registry = open_registry(args.registry or args.demo / "gate")
    docs = load_documents(data_files(args), args.max_docs_per_file, args.seed)
    tokenizer = load_tokenizer(configs[0].model_path)
    sequences = tokenize(tokenizer, [d["text"] for d in docs], args.doc_tokens)
    if len(sequences) < 10:
        raise SystemExit(f"ensemble train-gate: only {len(sequences)} usable documents; need at least 10")
    fingerprint, vocab = tokenizer_fingerprint(configs[0].model_path), vocab_size_of(configs[0].model_path)
    tag = scoring_tag(configs, fingerprint)
    cache = registry.root / "cache" / f"{cache_key([c.name for c in configs], sequences, args.top_logprobs, tag)}.npz"
    if cache.exists():                      # same experts, documents and k: reuse, no engines needed
        corpus = load_scored(cache)
    elif len(configs) > ENGINES_AT_ONCE:    # e.g. the 8-expert demo: a few engines at a time (memory)
        from gating.jobs import scored_in_groups

        corpus = await scored_in_groups(configs, sequences, args.top_logprobs, registry.root / "cache", fingerprint,
                                        "scoring", ENGINES_AT_ONCE)
    else:
        async with running_experts(configs) as experts:
            infos = await asyncio.gather(*(e.info() for e in experts.values()))
            if infos[0].tokenizer_fingerprint != fingerprint:
                raise ValueError("the experts' tokenizer differs from the one in their checkpoint directory")
            corpus = await scored(experts, sequences, args.top_logprobs, registry.root / "cache", tag, "scoring")
    train_docs, val_docs = train_test_split(list(range(corpus.n_docs)), test_size=0.15, random_state=args.seed)
    gate_args = GateArgs(vocab_size=vocab, n_experts=len(configs), embed_dim=32, hidden_dim=args.hidden,
                         features=args.features)
    fit = FitArgs(k=args.k, space=args.mix, epochs=args.epochs, seed=args.seed, max_positions=args.fit_positions)
    gate, history = fit_gate(corpus, train_docs, val_docs, gate_args, fit, vocab)
    router = DocRouter.fit(corpus, vocab, seed=args.seed)
    version = registry.next_version()
    metrics = {"val_nll": history["best_val_nll"], "initial_val_nll": history["val_nll"][0],
               "train_docs": len(train_docs), "val_docs": len(val_docs), "tokens": len(corpus.targets)}
    ckpt = GateCheckpoint(version, gate_args, gate.state_dict(), [c.name for c in configs], fingerprint,
                          top_k=args.k, mix_space=args.mix, parent=registry.current(), metrics=metrics)
    registry.add(ckpt, promote=True, reason="train-gate")
    router.save(registry.root / "doc_router.pkl")
    (registry.root / ".built").write_text(version + "\n")
    return {"version": version, "registry": registry.location, **metrics, "seconds": round(time.time() - t0, 1)}


def run(args) -> int:
    try:
        from orchestrator.cli import stdout_to_stderr

        with stdout_to_stderr():
            result = asyncio.run(train(args))
    except ValueError as err:
        print(f"ensemble train-gate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items()))
    return 0
