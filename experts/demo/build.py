"""`ensemble build-demo`: corpora -> shared tokenizer -> 4 domain experts + 1 generalist, under --out.

Writes experts/<name>/, generalist/, tokenizer/, data/, manifest.json and, last and only on success, .built.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

EXPERTS = ("code", "prose", "math", "json")
# Aggregate training throughput of the default setup (two single-thread workers, batch 2 x 512) on an idle
# 2-core machine of ours. Budgets are token counts derived from it, not wall-clock cut-offs, so a build is
# reproducible however busy the machine is; a busy machine just takes longer.
REFERENCE_TOKENS_PER_S = 5000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output directory")
    parser.add_argument("--minutes", type=float, default=14.0,
                        help="training budget at the reference throughput: 1/8 per expert, 4/8 for the generalist")
    parser.add_argument("--tokens-per-expert", type=int, default=None, help="override the budget in tokens")
    parser.add_argument("--quick", action="store_true", help="tiny corpora and a few dozen steps (~1-2 min)")
    parser.add_argument("--seed", type=int, default=0)
    # small batches: at this budget more optimizer steps beat bigger batches (16 -> 8 -> 4 rows of 256 tokens
    # gave held-out prose perplexity 639 -> 384 -> 312 after 250k tokens); 512 tokens covers the scoring windows
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, choices=(1, 2), default=2,
                        help="training processes: 2 = generalist and experts side by side, 1 thread each")


def log(msg: str) -> None:
    print(f"[build-demo] {msg}", flush=True)


def train_args(args: argparse.Namespace):
    from experts.demo.train import TrainArgs

    if args.quick:
        return TrainArgs(steps=24, seq_len=128, batch_size=4, lr=args.lr, warmup_steps=4, seed=args.seed)
    tokens = args.tokens_per_expert or int(args.minutes * 60 * REFERENCE_TOKENS_PER_S / 8)
    steps = max(1, tokens // (args.batch_size * args.seq_len))
    return TrainArgs(steps=steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                     warmup_steps=max(4, steps // 25), seed=args.seed)


def build_tokenizer(out: Path, corpora: dict):
    """Train on every domain's train split, save once under out/tokenizer, return the loaded tokenizer."""
    from experts.demo import tokenizer as tk

    texts = [d.text for splits in corpora.values() for d in splits["train"]]
    tok_dir = tk.save_tokenizer(tk.train_tokenizer(texts), out / "tokenizer")
    # transformers 5 writes its internal class name; this one also loads in 4.x (and vLLM's loaders)
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return tk.load_tokenizer(tok_dir)


def count_tokens(tokenizer, docs) -> int:
    return sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs]))


def corpus_stats(tokenizer, corpora: dict, mixed: dict) -> dict:
    stats = {domain: {split: {"docs": len(docs), "chars": sum(len(d.text) for d in docs),
                              "tokens": count_tokens(tokenizer, docs)} for split, docs in splits.items()}
             for domain, splits in corpora.items()}
    stats["mixed"] = {split: {"docs": len(docs), "tokens": count_tokens(tokenizer, docs),
                              "kinds": {k: sum(d.origin == k for d in docs) for k in sorted({d.origin for d in docs})}}
                      for split, docs in mixed.items()}
    return stats


def worker_plans(rows: dict, targs, out: Path, workers: int) -> list[list]:
    """Jobs per worker process. Two single-thread workers (one trains the generalist, the other the experts,
    equal token budgets) beat one two-thread trainer: small matmuls scale poorly across threads, and a
    thread barrier per op stalls badly when other processes share the cores."""
    import numpy as np

    gen_args = replace(targs, steps=targs.steps * len(EXPERTS), warmup_steps=targs.warmup_steps * len(EXPERTS))
    experts = [(name, rows[name], targs, out / "experts" / name) for name in EXPERTS]
    union = np.concatenate([rows[name] for name in EXPERTS])
    generalist = [("generalist", union[np.random.default_rng(targs.seed + 99).permutation(len(union))],
                   gen_args, out / "generalist")]
    if workers == 1:
        return [experts + generalist]
    threads = max(1, 2 // workers)
    return [[(n, r, replace(a, threads=threads), o) for n, r, a, o in plan] for plan in (generalist, experts)]


def train_all(out: Path, tokenizer, corpora: dict, targs, model_args, workers: int) -> dict:
    """Experts on their domain's train split; the generalist on the union of exactly those rows (4x budget)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from experts.demo import tokenizer as tk
    from experts.demo.model_config import mixtral_config
    from experts.demo.train import encode_docs, pack_rows, take_rows, train_jobs

    config = mixtral_config(model_args, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    n_rows = targs.steps * targs.batch_size
    rows = {}
    for i, name in enumerate(EXPERTS):
        docs = encode_docs(tokenizer, [d.text for d in corpora[name]["train"]])
        rows[name] = take_rows(pack_rows(docs, targs.seq_len, targs.seed + i), n_rows, targs.seed + i)
    plans = worker_plans(rows, targs, out, workers)
    # spawn, not fork: the parent has torch loaded and its thread pools must not be inherited
    with ProcessPoolExecutor(len(plans), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_jobs, config.to_dict(), plan, i) for i, plan in enumerate(plans)]
        stats = {name: s for f in futures for name, s in f.result().items()}
    for name in EXPERTS:
        tk.copy_tokenizer(out / "tokenizer", out / "experts" / name)
    tk.copy_tokenizer(out / "tokenizer", out / "generalist")
    return {name: stats[name] for name in (*EXPERTS, "generalist")}


def manifest(args, targs, model_args, tokenizer, corpora, mixed, stats, times) -> dict:
    import torch
    import transformers

    from experts.demo import corpora as cp

    return {
        "seed": args.seed, "quick": args.quick,
        "model": {"architecture": "MixtralForCausalLM", **model_args.to_dict(), "tie_word_embeddings": False,
                  "dtype": "float32"},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "special_tokens": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"},
                      "bos_added_by_post_processor": True},
        "training": {"args": asdict(targs), "optimizer": "AdamW(0.9, 0.95), cosine with warmup, fp32",
                     "workers": args.workers,
                     "budget": {"minutes": args.minutes, "reference_tokens_per_s": REFERENCE_TOKENS_PER_S,
                                "tokens_per_expert": targs.steps * targs.tokens_per_step,
                                "tokens_generalist": stats["generalist"]["tokens"]},
                     "aggregate_tokens_per_s": round(sum(s["tokens"] for s in stats.values()) / times["training"]),
                     "models": stats},
        "corpus": corpus_stats(tokenizer, corpora, mixed),
        "sources": cp.SOURCES, "source_chars": cp.origins_used(corpora), "package_licences": cp.licences_used(corpora),
        "wall_time_s": times, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def run(args: argparse.Namespace) -> int:
    from experts.demo import corpora as cp
    from experts.demo import mixed as mx
    from experts.demo.model_config import DemoModelArgs

    out: Path = args.out
    (out / ".built").unlink(missing_ok=True)  # a rebuild invalidates the marker until it succeeds
    times, t0 = {}, time.perf_counter()
    corpora = cp.build_corpora(out, quick=args.quick, seed=args.seed, log=log)
    times["corpora"] = round(time.perf_counter() - t0, 1)
    tokenizer = build_tokenizer(out, corpora)
    mixed = mx.write_mixed(out, corpora, args.seed, lambda t: len(tokenizer.backend_tokenizer.encode(t).ids),
                           args.quick, cp.write_jsonl)
    times["tokenizer_and_mixed"] = round(time.perf_counter() - t0 - times["corpora"], 1)
    log(f"tokenizer: {len(tokenizer)} tokens; mixed docs: gate {len(mixed['gate'])}, heldout {len(mixed['heldout'])}")
    model_args, targs = DemoModelArgs(), train_args(args)
    log(f"training {targs.steps} steps x {targs.tokens_per_step} tokens per expert, {4 * targs.steps} for the generalist")
    t1 = time.perf_counter()
    stats = train_all(out, tokenizer, corpora, targs, model_args, args.workers)
    times["training"] = round(time.perf_counter() - t1, 1)
    times["total"] = round(time.perf_counter() - t0, 1)
    info = manifest(args, targs, model_args, tokenizer, corpora, mixed, stats, times)
    (out / "manifest.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    (out / ".built").write_text(f"built in {times['total']} s\n")
    log(f"done in {times['total']} s -> {out}")
    return 0
