"""Offline quality study of gates on both demo held-out splits, from the scoring cache (no engine starts).

Evaluates each gate in each mixing space, and the cross-listed tail guess of gating.mix at several values,
exactly as `ensemble eval` does (gating.evaluate.evaluate), but without re-running anything the cache holds:
`ensemble eval` must have scored the splits once (it caches experts' and generalist's scores in DEMO/gate/cache).

    .venv/bin/python scripts/quality_study.py --demo artifacts/demo \
        --gate artifacts/demo/gate --gate artifacts/demo/gate-logits --spaces probs logits --interps 0 0.75

One JSON line per (gate, space, interp, split) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_split(demo: Path, cache: Path, split: Path, names: list[str], top_k: int, doc_tokens: int):
    from experts.tokenizer_check import tokenizer_fingerprint
    from gating.jobs import demo_expert_configs, generalist_config, load_tokenizer, read_jsonl, tokenize
    from gating.scores import cache_key, load_scored, scoring_tag

    model_path = demo / "experts" / names[0]
    fingerprint = tokenizer_fingerprint(str(model_path))
    seqs = tokenize(load_tokenizer(str(model_path)), [d["text"] for d in read_jsonl([split])], doc_tokens)
    out = []
    for group in (demo_expert_configs(demo, tuple(names), top_k=top_k), [generalist_config(demo, top_k=top_k)]):
        path = cache / f"{cache_key([c.name for c in group], seqs, top_k, scoring_tag(group, fingerprint))}.npz"
        if not path.exists():
            raise SystemExit(f"{split}: {'+'.join(c.name for c in group)} not in {cache}; run `ensemble eval --demo "
                             f"{demo}` once")
        out.append(load_scored(path))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--gate", type=Path, action="append", help="checkpoint or registry directory, repeatable")
    p.add_argument("--cache", type=Path, help="scoring cache (default DEMO/gate/cache)")
    p.add_argument("--spaces", nargs="+", default=["probs", "logits"])
    p.add_argument("--interps", type=float, nargs="+", default=[None], help="gating.mix CROSS_LISTED_INTERP values")
    p.add_argument("--adaptive", type=float, nargs="*", default=[])
    p.add_argument("--splits", nargs="+", default=["heldout_mixed", "independent"])
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--doc-tokens", type=int, default=512)
    args = p.parse_args(argv)

    import torch

    import gating.mix as gm
    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.doc_router import DocRouter
    from gating.evaluate import evaluate
    from gating.jobs import vocab_size_of

    torch.set_num_threads(1)
    gates = args.gate or [args.demo / "gate"]
    ckpts = [load_checkpoint(resolve_gate_path(g)) for g in gates]
    names = list(ckpts[0].expert_names)
    vocab = vocab_size_of(str(args.demo / "experts" / names[0]))
    cache = args.cache or args.demo / "gate" / "cache"
    router_path = args.demo / "gate" / "doc_router.pkl"
    router = DocRouter.load(router_path) if router_path.exists() else None
    splits = {s: load_split(args.demo, cache, args.demo / "data" / "eval" / f"{s}.jsonl", names, args.top_logprobs,
                            args.doc_tokens) for s in args.splits}
    default_interp = gm.CROSS_LISTED_INTERP
    for gate_path, ckpt in zip(gates, ckpts):
        gate = ckpt.build()
        for space in args.spaces:
            for interp in args.interps:
                gm.CROSS_LISTED_INTERP = default_interp if interp is None else interp
                for split, (corpus, generalist) in splits.items():
                    t0 = time.time()
                    s = evaluate(corpus, vocab, space, gate=gate, router=router, generalist=generalist,
                                 adaptive=tuple(args.adaptive) or None)
                    print(json.dumps({"gate": str(gate_path), "version": ckpt.version, "trained_space": ckpt.mix_space,
                                      "features": ckpt.args.features, "space": space,
                                      "interp": gm.CROSS_LISTED_INTERP, "split": split,
                                      "seconds": round(time.time() - t0, 1), **s}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
