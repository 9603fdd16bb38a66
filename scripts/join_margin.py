"""What would fewer mid-sequence joins cost in quality? (offline)

Every top-2 request at c=32 brings in all four experts, and each expert the gate picks for the first time
mid-sequence ("a join") prefills the whole context: half of what the experts prefill, ≈ 6-7 % of top-2's
throughput (docs/speed-history.md). This rolls the served gate out on both eval splits with top-2 routing in
which an expert that has not been selected yet in the document must beat the weaker of the others by a
margin m (in gate logits) to be picked, and reports the perplexity (the gate's own mixing space, the served
top-k representation, as `ensemble eval`) against the experts opened per document. m = 0 is the served rule
and reproduces `ensemble eval`'s gate top-2. Reads `ensemble eval`'s scoring cache (run it once first).

    .venv/bin/python scripts/join_margin.py --margins 0 1 2 3 4 6            # ≈ 1 min per margin
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sticky_rule(margin: float):
    """-> (a Select for gating.rollout, the list its choices are appended to), for one document at a time:
    top-2 of the gate logits plus `margin` for every expert selected earlier in the document."""
    import torch

    chosen: list[torch.Tensor] = []                     # [1, E] bool per position, in order

    def select(logits: torch.Tensor) -> torch.Tensor:
        opened = torch.stack(chosen).any(0) if chosen else torch.zeros_like(logits, dtype=torch.bool)
        idx = (logits + margin * opened.float()).topk(2, -1).indices
        chosen.append(torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True))
        return chosen[-1]

    return select, chosen


def route_document(gate, corpus, doc: int, margin: float):
    """-> (gate logits with the unselected experts at -1e9, so that top-2 mixing takes the selected pair with
    Mixtral's weights; selection mask [T, E], as the rollout chose)."""
    import torch

    from gating.evaluate import gate_logits_for

    select, chosen = sticky_rule(margin)
    logits = gate_logits_for(gate, corpus, docs=[doc], select=select)
    masks = torch.cat(chosen)
    return torch.where(masks, logits, torch.full_like(logits, -1e9)), masks


async def main(argv: list[str] | None = None) -> int:
    import torch

    from gating.checkpoint import load_checkpoint, resolve_gate_path
    from gating.evaluate import ppl
    from gating.evaluate_cli import add_arguments, data_files, score_files
    from gating.jobs import demo_expert_configs, generalist_config, vocab_size_of
    from gating.objective import gated_logprob

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    args = p.parse_args(argv)
    gate_arg = args.gate or args.demo / "gate"
    ckpt = load_checkpoint(resolve_gate_path(gate_arg))
    configs = demo_expert_configs(args.demo, tuple(ckpt.expert_names), top_k=args.top_logprobs)
    cache = (gate_arg if gate_arg.is_dir() else gate_arg.parent) / "cache"     # where `ensemble eval` keeps it
    corpora = await score_files(data_files(args), args, configs, generalist_config(args.demo, top_k=args.top_logprobs),
                                cache, args.max_docs)
    gate, vocab = ckpt.build(), vocab_size_of(configs[0].model_path)
    gate.eval()
    for f, (corpus, _generalist) in corpora.items():
        for m in args.margins:
            routed = [route_document(gate, corpus, d, m) for d in range(corpus.n_docs)]
            logits = torch.cat([lg for lg, _ in routed])
            lp = gated_logprob(corpus.ids, corpus.lps, corpus.targets, logits, 2, vocab, ckpt.mix_space)
            first64 = sum(int(mask[:64].any(0).sum()) for _, mask in routed) / len(routed)
            whole = sum(int(mask.any(0).sum()) for _, mask in routed) / len(routed)
            print(f"{f.stem}: margin {m:g}: gate top-2 perplexity {ppl(lp):.2f}, experts opened per document "
                  f"{first64:.2f} in its first 64 positions, {whole:.2f} in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
