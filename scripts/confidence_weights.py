"""Would the two selected experts' own confidence on the current token make better mixing weights? (offline)

After the gate picks its top 2 and both experts are stepped, their top-k for the position are known for free
(no unselected expert is called). This reweights the pair: softmax(gate_logit / tau + theta . phi), where phi per
selected expert is its top-1 logprob, log of its top-k mass, the entropy of its normalised top-k, and its top-1
minus top-2 logprob. theta and tau are fitted (Adam, 150 steps) on one split and applied to both, each way
round. The served rule is theta = 0, tau = 1. Reads `ensemble eval`'s scoring cache (run it once); ≈ 4 min.

    .venv/bin/python scripts/confidence_weights.py --demo artifacts/demo

One JSON line per fit: perplexity of gate top-2, its ratio to the generalist and its share of the
best-expert -> oracle gap on both splits.
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


def features(lps):
    """lps [N, S, K] (descending) -> [N, S, 4]."""
    import torch

    p = lps.exp()
    mass = p.sum(-1)
    q = p / mass[..., None]
    entropy = -(q * q.clamp_min(1e-12).log()).sum(-1)
    return torch.stack([lps[..., 0], mass.log(), entropy, lps[..., 0] - lps[..., 1]], -1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from quality_study import load_split

    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.evaluate import gate_logits_for, ppl
    from gating.jobs import vocab_size_of
    from gating.mix import gate_weights
    from gating.objective import mixture_logprob, select_experts, single_expert_logprob

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(resolve_gate_path(args.demo / "gate"))
    gate, names, space = ckpt.build(), list(ckpt.expert_names), ckpt.mix_space
    vocab = vocab_size_of(str(args.demo / "experts" / names[0]))
    splits = {}
    for split in ("heldout_mixed", "independent"):
        corpus, gen = load_split(args.demo, args.demo / "gate" / "cache",
                                 args.demo / "data" / "eval" / f"{split}.jsonl", names, 20, 512)
        logits = gate_logits_for(gate, corpus, k=2)
        experts, _ = gate_weights(logits, 2)
        _, lps = select_experts(corpus.ids, corpus.lps, experts)
        single = single_expert_logprob(corpus.ids, corpus.lps, corpus.targets, vocab)
        splits[split] = {
            "corpus": corpus, "experts": experts, "phi": features(lps), "gate": logits.gather(1, experts),
            "best": min(ppl(single[:, e]) for e in range(len(names))), "oracle": ppl(single.max(1).values),
            "generalist": ppl(single_expert_logprob(gen.ids, gen.lps, gen.targets, vocab)[:, 0]),
        }

    def logprob(d, theta, tau):
        weights = torch.softmax(d["gate"] / tau + (d["phi"] * theta).sum(-1), -1)
        c = d["corpus"]
        return mixture_logprob(c.ids, c.lps, c.targets, d["experts"], weights, vocab, space)

    def report(tag, theta, tau):
        out = {"fit": tag, "theta": [round(float(x), 3) for x in theta], "tau": round(float(tau), 3)}
        for name, d in splits.items():
            with torch.no_grad():
                top2 = ppl(logprob(d, theta, tau))
            gap = (math.log(d["best"]) - math.log(top2)) / (math.log(d["best"]) - math.log(d["oracle"]))
            out[name] = {"gate_top2": round(top2, 1), "vs_generalist": round(top2 / d["generalist"], 4),
                         "gap_recovered": round(gap, 3)}
        print(json.dumps(out), flush=True)

    report("served", torch.zeros(4), torch.tensor(1.0))
    for fit_on, d in splits.items():
        theta, log_tau = torch.zeros(4, requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([theta, log_tau], lr=0.05)
        for _ in range(args.steps):
            opt.zero_grad()
            (-logprob(d, theta, log_tau.exp()).mean()).backward()
            opt.step()
        report(f"on {fit_on}", theta.detach(), log_tau.exp().detach())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
