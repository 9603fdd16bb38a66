"""Would a temperature on the mixed distribution help the mix more than the generalist? (offline)

p_τ(x) ∝ p(x)^(1/τ) over the whole vocabulary (candidates and the tail), for the served gate's top-2 mix and
for the generalist alike, on both eval splits and in both mixing spaces. If the mix gained more than the
generalist from some τ, the gate could learn a per-token sharpness; if both are best near τ = 1, the experts
are calibrated and there is nothing to win here. Reads `ensemble eval`'s scoring cache (run it once first).

    .venv/bin/python scripts/mix_temperature.py --demo artifacts/demo            # ≈ 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def tempered_logprob(mixed, target, tau: float, vocab_size: int):
    """log p_τ(target) for a gating.mix.Mixed: each candidate's logprob and the tail's, divided by τ and
    renormalised over the full vocabulary. -> [B]"""
    import torch

    from gating.mix import logprob_of

    n_tail = (vocab_size - mixed.first.sum(-1)).to(mixed.cand_logprobs.dtype)
    tail = mixed.tail_logprob / tau + n_tail.clamp_min(1).log()
    log_z = torch.logsumexp(torch.cat([mixed.cand_logprobs / tau, tail[:, None]], 1), 1)
    return logprob_of(mixed, target) / tau - log_z


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.9, 1.0, 1.05, 1.1, 1.2, 1.5])
    args = p.parse_args(argv)

    import torch
    from quality_study import load_split

    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.evaluate import gate_logits_for
    from gating.jobs import vocab_size_of
    from gating.mix import gate_weights, mix
    from gating.objective import select_experts

    torch.set_num_threads(1)
    served = load_checkpoint(resolve_gate_path(args.demo / "gate"))
    names, gate = list(served.expert_names), served.build()
    vocab = vocab_size_of(str(args.demo / "experts" / names[0]))
    for split in ("heldout_mixed", "independent"):
        corpus, gen = load_split(args.demo, args.demo / "gate" / "cache",
                                 args.demo / "data" / "eval" / f"{split}.jsonl", names, 20, 512)
        experts, weights = gate_weights(gate_logits_for(gate, corpus, k=served.top_k), served.top_k)
        ids, lps = select_experts(corpus.ids, corpus.lps, experts)
        for space in ("probs", "logits"):
            mixed = mix(ids, lps, weights, vocab, space)
            alone = mix(gen.ids, gen.lps, torch.ones(len(gen.targets), 1), vocab, space)
            for tau in args.taus:
                pm = math.exp(-tempered_logprob(mixed, corpus.targets, tau, vocab).mean().item())
                pg = math.exp(-tempered_logprob(alone, gen.targets, tau, vocab).mean().item())
                print(json.dumps({"split": split, "space": space, "tau": tau, "gate_top2": round(pm, 1),
                                  "generalist": round(pg, 1), "ratio": round(pm / pg, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
