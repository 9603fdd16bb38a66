"""`ensemble eval`: perplexity of each expert, the uniform mix, the per-document router, the generalist,
the gate (top-1 and top-2) and the per-token oracle on a JSONL file, all scored through Serve deployments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gating.jobs import DEFAULT_DOC_TOKENS, DEFAULT_TOP_K


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="JSONL, one document per line with a 'text' field")
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo build directory (default %(default)s)")
    p.add_argument("--gate", type=Path, help="gate checkpoint or registry directory (default: DEMO/gate)")
    p.add_argument("--mix", choices=["logits", "probs"], help="mixing space (default: the gate's own)")
    p.add_argument("--doc-tokens", type=int, default=DEFAULT_DOC_TOKENS)
    p.add_argument("--top-logprobs", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--max-docs", type=int, default=0, help="evaluate only the first N documents (0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, help="write a PNG of the gate's choice along the first documents")


async def evaluate_file(args) -> tuple[dict, object]:
    from deploy.local_experts import running_experts
    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.doc_router import DocRouter
    from gating.evaluate import evaluate
    from gating.jobs import (
        demo_expert_configs,
        generalist_config,
        load_tokenizer,
        read_jsonl,
        scored,
        tokenize,
    )

    ckpt = load_checkpoint(resolve_gate_path(args.gate or args.demo / "gate"))
    configs = demo_expert_configs(args.demo, tuple(ckpt.expert_names))
    docs = read_jsonl([args.data])[: args.max_docs or None]
    sequences = tokenize(load_tokenizer(configs[0].model_path), [d["text"] for d in docs], args.doc_tokens)
    if not sequences:
        raise ValueError(f"{args.data}: no document with at least 2 tokens")
    gate_arg = args.gate or args.demo / "gate"
    gate_dir = gate_arg if gate_arg.is_dir() else gate_arg.parent     # holds cache/ and doc_router.pkl
    cache = gate_dir / "cache"
    gen_cfg = generalist_config(args.demo)
    has_generalist = Path(gen_cfg.model_path).exists()
    async with running_experts(configs + ([gen_cfg] if has_generalist else [])) as clients:
        info = await clients[configs[0].name].info()
        fingerprint, vocab = info.tokenizer_fingerprint, info.vocab_size
        ckpt.check_matches([c.name for c in configs], fingerprint)
        experts = {c.name: clients[c.name] for c in configs}
        corpus = await scored(experts, sequences, args.top_logprobs, cache, fingerprint, "scoring (experts)")
        generalist = None
        if has_generalist:
            generalist = await scored({"generalist": clients["generalist"]}, sequences, args.top_logprobs, cache,
                                      fingerprint, "scoring (generalist)")
    router_path = gate_dir / "doc_router.pkl"
    router = DocRouter.load(router_path) if router_path.exists() else None
    gate = ckpt.build()
    summary = evaluate(corpus, vocab, args.mix or ckpt.mix_space, gate=gate, router=router, generalist=generalist)
    summary["gate_version"] = ckpt.version
    return summary, (corpus, gate)


def run(args) -> int:
    from gating.evaluate import format_table

    try:
        from orchestrator.cli import stdout_to_stderr

        with stdout_to_stderr():
            summary, (corpus, gate) = asyncio.run(evaluate_file(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"ensemble eval: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))
    if args.plot:
        from gating.plots import plot_routing

        plot_routing(corpus, gate, args.plot)
        print(f"routing plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
