"""Perplexity of every expert, the baselines and the gate on one scored corpus, all through one mix function.

Every number uses each expert's top-k + floor representation (gating.mix), the distribution the service
actually samples from, so methods differ only in how they choose and weight experts.
"""

from __future__ import annotations

import math

import torch

from gating.doc_router import DocRouter
from gating.mix import gate_weights
from gating.model import Gate
from gating.objective import gated_logprob, single_expert_logprob, uniform_logprob
from gating.scores import ScoredCorpus


@torch.no_grad()
def gate_logits_for(gate: Gate, corpus: ScoredCorpus, docs: list[int] | None = None) -> torch.Tensor:
    """Teacher-forced gate logits for the rows of `docs` (default: every document), in document order -> [N, E]."""
    gate.eval()
    out = []
    for d in range(corpus.n_docs) if docs is None else docs:
        logits, _ = gate(corpus.context[corpus.doc_rows(d)][None])
        out.append(logits[0])
    return torch.cat(out)


def ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.mean()))


@torch.no_grad()
def evaluate(
    corpus: ScoredCorpus, vocab_size: int, space: str, gate: Gate | None = None, router: DocRouter | None = None,
    generalist: ScoredCorpus | None = None,
) -> dict:
    """-> {"documents", "tokens", "perplexity": {...}, "gate_share": {...}, "gap_recovered": ...}"""
    torch.set_num_threads(1)            # tiny ops: OpenMP threads only spin (see gating/train.py)
    single = single_expert_logprob(corpus.ids, corpus.lps, corpus.targets, vocab_size)   # [N, E]
    result: dict[str, float] = {f"expert:{n}": ppl(single[:, e]) for e, n in enumerate(corpus.expert_names)}
    result["uniform"] = ppl(uniform_logprob(corpus.ids, corpus.lps, corpus.targets, vocab_size, space))
    if router is not None:
        picks = torch.as_tensor(router.predict(corpus.sequences))                      # [D]
        result["doc_router"] = ppl(single.gather(1, picks[corpus.doc][:, None])[:, 0])
    if generalist is not None:
        g = single_expert_logprob(generalist.ids, generalist.lps, generalist.targets, vocab_size)
        result["generalist"] = ppl(g[:, 0])
    share: dict[str, float] = {}
    if gate is not None:
        logits = gate_logits_for(gate, corpus)
        for k in (1, 2):
            result[f"gate_top{k}"] = ppl(gated_logprob(corpus.ids, corpus.lps, corpus.targets, logits, k, vocab_size, space))
        chosen, _ = gate_weights(logits, 1)
        counts = torch.bincount(chosen[:, 0], minlength=len(corpus.expert_names)).float()
        share = {n: float(c / counts.sum()) for n, c in zip(corpus.expert_names, counts)}
    result["oracle"] = ppl(single.max(1).values)
    summary = {"documents": corpus.n_docs, "tokens": len(corpus.targets), "mix": space, "perplexity": result}
    if gate is not None:
        best = min(v for k, v in result.items() if k.startswith("expert:"))
        # share of the best-single-expert -> oracle gap the gate closes, in log-perplexity (NLL) units
        gap = math.log(best) - math.log(result["oracle"])
        summary["gap_recovered"] = (math.log(best) - math.log(result["gate_top2"])) / gap if gap > 0 else 0.0
        summary["gate_top1_share"] = share
    return summary


def format_table(summary: dict) -> str:
    """A readable table, best first, with each row's ratio to the best single expert."""
    pp = summary["perplexity"]
    best = min(v for k, v in pp.items() if k.startswith("expert:"))
    lines = [f"{summary['documents']} documents, {summary['tokens']} tokens, mixing in {summary['mix']} space", "",
             f"{'method':<18}{'perplexity':>12}{'× best expert':>16}"]
    for name, value in sorted(pp.items(), key=lambda kv: kv[1]):
        lines.append(f"{name:<18}{value:>12.2f}{value / best:>16.3f}")
    if "gap_recovered" in summary:
        lines += ["", f"gate_top2 recovers {100 * summary['gap_recovered']:.1f}% of the best-expert → oracle gap",
                  "gate top-1 share: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["gate_top1_share"].items())]
    return "\n".join(lines)
