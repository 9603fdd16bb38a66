"""`ensemble eval`: perplexity of each expert, the uniform mix, the per-document router, the generalist,
the gate (top-1, top-2, adaptive) and the per-token oracle on JSONL files, all scored through Serve deployments.

Without --data it evaluates both held-out splits of the demo build: the project's own held-out mixed
documents and the independent split (natural documents from sources no demo corpus reads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gating.jobs import DEFAULT_DOC_TOKENS, DEFAULT_TOP_K

DEMO_SPLITS = ("heldout_mixed", "independent")     # data/eval/<split>.jsonl of a demo build
ENGINES_AT_ONCE = 4     # more experts than this are scored in groups (each CPU vLLM engine holds ~1.5 GB)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+",
                   help="JSONL, one document per line with a 'text' field (default: both demo held-out splits)")
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo build directory (default %(default)s)")
    p.add_argument("--gate", type=Path, help="gate checkpoint or registry directory (default: DEMO/gate)")
    p.add_argument("--mix", choices=["logits", "probs"], help="mixing space (default: the gate's own)")
    p.add_argument("--doc-tokens", type=int, default=DEFAULT_DOC_TOKENS)
    p.add_argument("--top-logprobs", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--max-docs", type=int, default=0, help="evaluate only the first N documents (0 = all)")
    p.add_argument("--adaptive", type=float, nargs="*", default=[0.6, 0.8, 0.9, 0.95],
                   help="thresholds of the adaptive-k rule to report (gating/adaptive.py; none: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, help="write a PNG of the gate's choice along the first documents")


def data_files(args) -> list[Path]:
    if args.data:
        return list(args.data)
    files = [args.demo / "data" / "eval" / f"{s}.jsonl" for s in DEMO_SPLITS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}; run `ensemble build-eval-split` or pass --data")
    return files


async def score_files(files: list[Path], args, configs, gen_cfg, cache: Path, max_docs: int = 0) -> dict:
    """{file: (experts' ScoredCorpus, generalist's ScoredCorpus | None)}; engines start only if a cache misses."""
    from experts.tokenizer_check import tokenizer_fingerprint
    from gating.jobs import load_tokenizer, read_jsonl, scored, scored_in_groups, tokenize
    from gating.scores import cache_key, load_scored, scoring_tag

    tokenizer = load_tokenizer(configs[0].model_path)
    fingerprint = tokenizer_fingerprint(configs[0].model_path)
    has_generalist = Path(gen_cfg.model_path).exists()
    jobs = {}
    for f in files:
        docs = read_jsonl([f])[: max_docs or None]
        seqs = tokenize(tokenizer, [d["text"] for d in docs], args.doc_tokens)
        if not seqs:
            raise ValueError(f"{f}: no document with at least 2 tokens")
        jobs[f] = seqs
    groups = [[c.name for c in configs]] + ([["generalist"]] if has_generalist else [])
    by_name = {c.name: c for c in [*configs, gen_cfg]}
    tags = [scoring_tag([by_name[n] for n in g], fingerprint) for g in groups]

    def cached(names, seqs, tag):
        path = cache / f"{cache_key(names, seqs, args.top_logprobs, tag)}.npz"
        return load_scored(path) if path.exists() else None

    out = {f: [cached(g, seqs, tag) for g, tag in zip(groups, tags)] for f, seqs in jobs.items()}
    if len(configs) > ENGINES_AT_ONCE:          # many experts: a few engines at a time (memory), cached by group
        for f, seqs in jobs.items():
            if out[f][0] is None:
                out[f][0] = await scored_in_groups(configs, seqs, args.top_logprobs, cache, fingerprint,
                                                   f"scoring {f.stem}", ENGINES_AT_ONCE)
    if any(c is None for pair in out.values() for c in pair):
        from deploy.local_experts import running_experts

        needed = [c for c in configs if any(pair[0] is None for pair in out.values())]
        async with running_experts(needed + ([gen_cfg] if has_generalist else [])) as clients:
            info = await clients[(needed or [gen_cfg])[0].name].info()
            if info.tokenizer_fingerprint != fingerprint:
                raise ValueError("the experts' tokenizer differs from the one in their checkpoint directory")
            for f, seqs in jobs.items():
                for i, g in enumerate(groups):
                    if out[f][i] is None:
                        out[f][i] = await scored({n: clients[n] for n in g}, seqs, args.top_logprobs, cache,
                                                 tags[i], f"scoring {f.stem} ({'+'.join(g)})")
    return {f: (pair[0], pair[1] if has_generalist else None) for f, pair in out.items()}


async def evaluate_files(args) -> tuple[dict, dict]:
    from experts.tokenizer_check import tokenizer_fingerprint
    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.doc_router import DocRouter
    from gating.evaluate import evaluate
    from gating.jobs import demo_expert_configs, generalist_config, vocab_size_of

    ckpt = load_checkpoint(resolve_gate_path(args.gate or args.demo / "gate"))
    configs = demo_expert_configs(args.demo, tuple(ckpt.expert_names), top_k=args.top_logprobs)
    ckpt.check_matches([c.name for c in configs], tokenizer_fingerprint(configs[0].model_path))
    gate_arg = args.gate or args.demo / "gate"
    gate_dir = gate_arg if gate_arg.is_dir() else gate_arg.parent     # holds cache/ and doc_router.pkl
    files = data_files(args)
    corpora = await score_files(files, args, configs, generalist_config(args.demo, top_k=args.top_logprobs),
                                gate_dir / "cache", args.max_docs)
    router_path = gate_dir / "doc_router.pkl"
    router = DocRouter.load(router_path) if router_path.exists() else None
    gate = ckpt.build()
    vocab = vocab_size_of(configs[0].model_path)
    summaries = {}
    for f, (corpus, generalist) in corpora.items():
        summary = evaluate(corpus, vocab, args.mix or ckpt.mix_space, gate=gate, router=router, generalist=generalist,
                           adaptive=tuple(args.adaptive) or None)
        summary["gate_version"] = ckpt.version
        summary["data"] = str(f)
        summaries[f] = summary
    return summaries, {f: c for f, (c, _) in corpora.items()}


def run(args) -> int:
    from gating.evaluate import format_table

    try:
        from orchestrator.cli import stdout_to_stderr

        with stdout_to_stderr():
            summaries, corpora = asyncio.run(evaluate_files(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"ensemble eval: {err}", file=sys.stderr)
        return 2
    names = {f: f.stem for f in summaries}
    if args.json:
        # one file: its summary (the format scripts read); several: {"splits": {name: summary}}
        only = len(summaries) == 1
        print(json.dumps(next(iter(summaries.values())) if only else
                         {"splits": {names[f]: s for f, s in summaries.items()}}))
    else:
        print("\n\n".join(f"== {names[f]} ({f})\n{format_table(s)}" for f, s in summaries.items()))
    if args.plot:
        from gating.checkpoint import load_checkpoint, resolve_gate_path
        from gating.plots import plot_routing

        gate = load_checkpoint(resolve_gate_path(args.gate or args.demo / "gate")).build()
        plot_routing(next(iter(corpora.values())), gate, args.plot)
        print(f"routing plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
