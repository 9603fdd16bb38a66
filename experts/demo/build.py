"""`ensemble build-demo`: corpora -> shared tokenizer -> 4 domain experts + 1 generalist, under --out.

Writes experts/<name>/, generalist/, tokenizer/, data/, manifest.json and, last and only on success, .built.
"""

from __future__ import annotations

import argparse
import json
import os
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
    # c-BTM: a seed on an equal mix of the domains takes half the budget; then each expert branches on its own
    # domain and the generalist continues on the union (seed counted once: equal total budgets). Measured:
    # from scratch (--seed-share 0 --minutes 14) the generalist beat three experts on their own domains and
    # the gated mix lost to it (1.10x); seeded, experts match or beat it in-domain and the mix wins (0.87x).
    # The budget is counted at one core's reference throughput; the seed trains data-parallel on both cores and
    # the branches side by side on two, so 9.33 min of budget takes ≈ 7 min of training (499 s for the whole build).
    parser.add_argument("--minutes", type=float, default=9.33,
                        help="training budget in minutes at the reference throughput (all models together)")
    parser.add_argument("--seed-share", type=float, default=0.5,
                        help="share of the budget for a seed model all experts branch from (0: from scratch)")
    # Replay: each expert's branch keeps this share of rows from the other domains (fresh rows, equal per domain),
    # the usual guard of branched experts against forgetting what the seed knew outside their domain.
    parser.add_argument("--replay", type=_replay_share, default=0.0,
                        help="share of each expert's branch rows drawn from the other domains (0: own domain only)")
    parser.add_argument("--quick", action="store_true", help="tiny corpora and a few dozen steps (~1-2 min)")
    parser.add_argument("--seed", type=int, default=0)
    # small batches: at this budget more optimizer steps beat bigger batches (16 -> 8 -> 4 rows of 256 tokens
    # gave held-out prose perplexity 639 -> 384 -> 312 after 250k tokens); 512 tokens covers the scoring windows
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, choices=(1, 2), default=2,
                        help="training processes, 1 thread each: 2 = the seed data-parallel, then the generalist "
                             "and the experts side by side")
    parser.add_argument("--experts", type=int, choices=(4, 8), default=4,
                        help="8: split each domain of the --base build in two and branch 8 experts from its seed "
                             "(experts/demo/eight.py; reuses its tokenizer, seed, generalist and data)")
    parser.add_argument("--base", type=Path, default=Path("artifacts/demo"),
                        help="with --experts 8: the 4-expert build to branch from (default %(default)s)")


def _replay_share(text: str) -> float:
    """argparse type of --replay: a bad value is a usage error before any corpus work, not a traceback after."""
    try:
        replay_split(1, float(text), len(EXPERTS))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--replay ")) from None
    return float(text)


def log(msg: str) -> None:
    print(f"[build-demo] {msg}", flush=True)


def phase_args(args: argparse.Namespace, out: Path):
    """(seed, branch) TrainArgs. Token accounting: seed + 4 x branch for the experts together, and the
    generalist = the same seed + 4 x branch tokens of the union (c-BTM's compute-matched comparison)."""
    from experts.demo.train import TrainArgs

    if args.quick:
        total, size = 160 * 4 * 128, {"seq_len": 128, "batch_size": 4}
    else:
        total = int(args.minutes * 60 * REFERENCE_TOKENS_PER_S)
        size = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    per_step = size["seq_len"] * size["batch_size"]
    seed_steps = int(total * args.seed_share) // per_step // 4 * 4  # a multiple of 4: equal rows per domain
    branch_steps = max(1, (total - seed_steps * per_step) // 8 // per_step)  # 4 experts + generalist's 4x
    common = {**size, "lr": args.lr, "seed": args.seed}
    # one thread even alone: with two, a busy machine slowed the seed 20-fold (thread barriers), one degrades gently
    seed = TrainArgs(steps=seed_steps, warmup_steps=max(4, seed_steps // 25), decay=False, threads=1, **common)
    # a branch starts with a fresh optimizer at the seed's peak lr: a short re-warmup avoids a loss spike
    branch = TrainArgs(steps=branch_steps, warmup_steps=max(4, branch_steps // 25 if not seed_steps else 10),
                       init_from=out / "seed" if seed_steps else None, **common)
    return seed, branch


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
    gen_args = replace(targs, steps=targs.steps * len(EXPERTS), warmup_steps=targs.warmup_steps * len(EXPERTS))
    experts = [(name, rows[name], targs, out / "experts" / name) for name in EXPERTS]
    generalist = [("generalist", _shuffled_union([rows[name] for name in EXPERTS], targs.seed + 99),
                   gen_args, out / "generalist")]
    if workers == 1:
        return [experts + generalist]
    threads = max(1, 2 // workers)
    return [[(n, r, replace(a, threads=threads), o) for n, r, a, o in plan] for plan in (generalist, experts)]


def _shuffled_union(parts: list, seed: int):
    import numpy as np

    union = np.concatenate(parts)
    return union[np.random.default_rng(seed).permutation(len(union))]


def run_plans(config, plans: list[list]) -> dict:
    """Each plan in its own spawned process (the parent's torch thread pools must not be inherited)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from experts.demo.train import train_jobs

    with ProcessPoolExecutor(len(plans), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_jobs, config.to_dict(), plan, i) for i, plan in enumerate(plans)]
        return {name: s for f in futures for name, s in f.result().items()}


def run_data_parallel(config, plan: list, processes: int, scratch: Path) -> dict:
    """One plan trained by `processes` spawned processes together (experts/demo/data_parallel.py): one model on
    several cores. Returns the leader's stats."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from experts.demo.data_parallel import Group
    from experts.demo.train import train_jobs

    if processes == 1:
        return run_plans(config, [plan])
    scratch.mkdir(parents=True, exist_ok=True)
    rendezvous = (scratch / f".rendezvous-{os.getpid()}").resolve()      # file:// URLs need an absolute path
    rendezvous.unlink(missing_ok=True)
    try:
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(train_jobs, config.to_dict(), plan, 0, Group(rank, processes, rendezvous))
                       for rank in range(processes)]
            leader, *_ = [f.result() for f in futures]      # every process's errors surface here
            return leader
    finally:
        rendezvous.unlink(missing_ok=True)


def replay_split(n_rows: int, replay: float, n_domains: int) -> tuple[int, int]:
    """(own rows, rows from each other domain) of one expert's n_rows branch rows at a replay share."""
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"--replay must be in [0, 1), got {replay}")
    if n_domains < 2:
        return n_rows, 0
    per_other = min(round(n_rows * replay / (n_domains - 1)), n_rows // (n_domains - 1))   # n_own never < 0
    return n_rows - per_other * (n_domains - 1), per_other


def branch_rows(parts: dict, n_own: int, per_other: int, seed: int) -> dict:
    """parts[domain] = that domain's branch rows [own | one block of per_other rows for each other domain, in
    domain order] -> {expert: its rows, shuffled when they come from several domains}. Every row goes to
    exactly one expert."""
    names = list(parts)
    rows = {}
    for i, name in enumerate(names):
        picked = [parts[name][:n_own]]
        for other in names:
            if other != name:
                slot = [x for x in names if x != other].index(name)      # name's block among other's blocks
                start = n_own + slot * per_other
                picked.append(parts[other][start:start + per_other])
        rows[name] = _shuffled_union(picked, seed + 1000 + i) if per_other else picked[0]
    return rows


def train_all(out: Path, tokenizer, corpora: dict, seed_args, targs, model_args, workers: int,
              replay: float = 0.0) -> dict:
    """Seed on an equal mix of the domains; then each expert branches on its own domain (plus a `replay` share
    of the others) and the generalist continues on the union of exactly the experts' rows. Seed rows and branch
    rows never overlap, nor do two experts' rows."""
    from experts.demo import tokenizer as tk
    from experts.demo.model_config import mixtral_config
    from experts.demo.train import encode_docs, pack_rows, take_rows

    config = mixtral_config(model_args, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    n_seed = seed_args.steps * seed_args.batch_size // len(EXPERTS)
    n_own, per_other = replay_split(targs.steps * targs.batch_size, replay, len(EXPERTS))
    parts, seed_parts = {}, []
    for i, name in enumerate(EXPERTS):
        docs = encode_docs(tokenizer, [d.text for d in corpora[name]["train"]])
        picked = take_rows(pack_rows(docs, targs.seq_len, targs.seed + i),
                           n_seed + n_own + per_other * (len(EXPERTS) - 1), targs.seed + i)
        seed_parts.append(picked[:n_seed])
        parts[name] = picked[n_seed:]
    rows = branch_rows(parts, n_own, per_other, targs.seed)
    stats = {}
    if seed_args.steps:
        # one model: trained data-parallel on the cores the branch phase will use (2 processes: 1.8x faster)
        stats.update(run_data_parallel(config, [("seed", _shuffled_union(seed_parts, targs.seed + 98), seed_args,
                                                 out / "seed")], workers, out))
    stats.update(run_plans(config, worker_plans(rows, targs, out, workers)))
    for name in EXPERTS:
        tk.copy_tokenizer(out / "tokenizer", out / "experts" / name)
    for name in ("generalist", "seed"):
        if (out / name).is_dir():
            tk.copy_tokenizer(out / "tokenizer", out / name)
    return stats


def manifest(args, seed_args, targs, model_args, tokenizer, corpora, mixed, stats, times) -> dict:
    import torch
    import transformers

    from experts.demo import corpora as cp

    seed_tokens = seed_args.steps * seed_args.tokens_per_step

    return {
        "seed": args.seed, "quick": args.quick,
        "model": {"architecture": "MixtralForCausalLM", **model_args.to_dict(), "tie_word_embeddings": False,
                  "dtype": "float32"},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "special_tokens": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"},
                      "bos_added_by_post_processor": True},
        "training": {"seed_args": asdict(seed_args), "branch_args": asdict(targs), "workers": args.workers,
                     "optimizer": "AdamW(0.9, 0.95), warmup-stable-decay (seed holds the peak lr, branches decay "
                                  "it by cosine), fp32",
                     "budget": {"minutes": args.minutes, "reference_tokens_per_s": REFERENCE_TOKENS_PER_S,
                                "seed_share": args.seed_share, "replay": args.replay, "seed_tokens": seed_tokens,
                                "tokens_per_expert_branch": targs.steps * targs.tokens_per_step,
                                "experts_total_tokens": seed_tokens + 4 * targs.steps * targs.tokens_per_step,
                                "generalist_total_tokens": seed_tokens + stats["generalist"]["tokens"]},
                     "aggregate_tokens_per_s": round(sum(s["tokens"] for s in stats.values()) / times["training"]),
                     "models": stats},
        "corpus": corpus_stats(tokenizer, corpora, mixed),
        "sources": cp.SOURCES, "source_chars": cp.origins_used(corpora), "package_licences": cp.licences_used(corpora),
        "wall_time_s": times, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def run(args: argparse.Namespace) -> int:
    from experts.demo import corpora as cp
    from experts.demo import independent as ind
    from experts.demo import mixed as mx
    from experts.demo.model_config import DemoModelArgs

    out: Path = args.out
    (out / ".built").unlink(missing_ok=True)  # a rebuild invalidates the marker until it succeeds
    if args.experts == 8:
        from experts.demo.eight import build_eight

        t = time.perf_counter()
        build_eight(args.base, out, args.workers, log)
        log(f"done in {time.perf_counter() - t:.0f} s -> {out}")
        return 0
    times, t0 = {}, time.perf_counter()
    corpora = cp.build_corpora(out, quick=args.quick, seed=args.seed, log=log)
    times["corpora"] = round(time.perf_counter() - t0, 1)
    tokenizer = build_tokenizer(out, corpora)
    mixed = mx.write_mixed(out, corpora, args.seed, lambda t: len(tokenizer.backend_tokenizer.encode(t).ids),
                           args.quick, cp.write_jsonl)
    independent = ind.build_independent(out, lambda t: len(tokenizer.backend_tokenizer.encode(t).ids), args.seed,
                                        args.quick, log)
    times["tokenizer_and_mixed"] = round(time.perf_counter() - t0 - times["corpora"], 1)
    log(f"tokenizer: {len(tokenizer)} tokens; mixed docs: gate {len(mixed['gate'])}, heldout {len(mixed['heldout'])}; "
        f"independent held-out split: {len(independent)} docs")
    model_args, (seed_args, targs) = DemoModelArgs(), phase_args(args, out)
    log(f"training: seed {seed_args.steps} steps, then {targs.steps} steps per expert and {4 * targs.steps} for "
        f"the generalist, {targs.tokens_per_step} tokens per step")
    t1 = time.perf_counter()
    stats = train_all(out, tokenizer, corpora, seed_args, targs, model_args, args.workers, args.replay)
    times["training"] = round(time.perf_counter() - t1, 1)
    times["total"] = round(time.perf_counter() - t0, 1)
    info = manifest(args, seed_args, targs, model_args, tokenizer, corpora, mixed, stats, times)
    info["corpus"]["independent"] = {"docs": len(independent), "tokens": count_tokens(tokenizer, independent),
                                     "kinds": {k: sum(d.source.startswith(k + ":") for d in independent)
                                               for k in ind.KINDS},
                                     "debian_packages": sorted({d.origin[4:] for d in independent})}
    (out / "manifest.json").write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n")
    (out / ".built").write_text(f"built in {times['total']} s\n")
    log(f"done in {times['total']} s -> {out}")
    return 0
