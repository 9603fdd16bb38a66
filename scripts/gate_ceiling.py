"""Is the gate what holds the mix back on foreign text? Fit gates on the independent split itself and see.

Two-fold over the independent split's documents (seeded): for each half, the served gate is compared with
  fit       a gate of the same recipe fitted from scratch on the other half only (foreign text, in distribution)
  finetune  the served gate fine-tuned on the other half (lr 1e-3)
each evaluated exactly as `ensemble eval` does (gating.evaluate.evaluate, probability space, k = 2) on the
held-out half. If a gate that has seen this kind of text does no better than the served one, the limit is the
experts, not the gate. Offline: reads `ensemble eval`'s scoring cache, starts no engine (≈ 1 min).

    .venv/bin/python scripts/gate_ceiling.py --demo artifacts/demo

One JSON line per (fold, gate) on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def halves(n_docs: int, seed: int) -> tuple[list[int], list[int]]:
    docs = list(range(n_docs))
    random.Random(seed).shuffle(docs)
    return sorted(docs[: n_docs // 2]), sorted(docs[n_docs // 2:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--split", default="independent")
    p.add_argument("--seed", type=int, default=1, help="seed of the two-fold document split")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)

    import torch
    from quality_study import load_split

    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.evaluate import evaluate
    from gating.jobs import vocab_size_of
    from gating.train import FitArgs, fit_gate

    torch.set_num_threads(1)
    served = load_checkpoint(resolve_gate_path(args.demo / "gate"))
    names = list(served.expert_names)
    vocab = vocab_size_of(str(args.demo / "experts" / names[0]))
    corpus, generalist = load_split(args.demo, args.demo / "gate" / "cache",
                                    args.demo / "data" / "eval" / f"{args.split}.jsonl", names, 20, 512)
    fit = FitArgs(k=served.top_k, space=served.mix_space, epochs=args.epochs, seed=0)
    folds = halves(corpus.n_docs, args.seed)
    for fold, test_docs in enumerate(folds):
        train = corpus.documents(folds[1 - fold])
        order = list(range(train.n_docs))
        random.Random(0).shuffle(order)
        train_docs, val_docs = order[train.n_docs // 7:], order[: train.n_docs // 7]
        test, test_generalist = corpus.documents(test_docs), generalist.documents(test_docs)
        t0 = time.time()
        gates = {
            "served": served.build(),
            "fit": fit_gate(train, train_docs, val_docs, served.args, fit, vocab, progress=False)[0],
            "finetune": fit_gate(train, train_docs, val_docs, served.args, FitArgs(**{**fit.__dict__, "lr": 1e-3}),
                                 vocab, init_state=served.state_dict, progress=False)[0],
        }
        for name, gate in gates.items():
            s = evaluate(test, vocab, fit.space, gate=gate, generalist=test_generalist)
            pp = s["perplexity"]
            print(json.dumps({"split": args.split, "fold": fold, "gate": name, "test_docs": test.n_docs,
                              "train_docs": len(train_docs), "gate_top2": round(pp["gate_top2"], 1),
                              "generalist": round(pp["generalist"], 1), "uniform": round(pp["uniform"], 1),
                              "oracle": round(pp["oracle"], 1),
                              "gate_top2_vs_generalist": round(s["gate_top2_vs_generalist"], 3),
                              "gap_recovered": round(s["gap_recovered"], 3),
                              "seconds": round(time.time() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
