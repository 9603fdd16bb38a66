"""Perplexity of every expert, the baselines and the gate on one scored corpus, all through one mix function.

Every number uses each expert's top-k + floor representation (gating.mix), the distribution the service
actually samples from, so methods differ only in how they choose and weight experts.
"""

from __future__ import annotations

import math

import torch

from gating.adaptive import adaptive_k, selection_mask
from gating.doc_router import DocRouter
from gating.mix import gate_weights
from gating.model import Gate
from gating.objective import gated_logprob, single_expert_logprob, uniform_logprob
from gating.rollout import Select, corpus_signals, pad_rows, padded_signals, rollout, top_k_rule
from gating.scores import ScoredCorpus


@torch.no_grad()
def gate_logits_for(gate: Gate, corpus: ScoredCorpus, docs: list[int] | None = None, k: int = 2,
                    select: Select | None = None, batch: int = 64) -> torch.Tensor:
    """Teacher-forced gate logits for the rows of `docs` (default: every document), in document order -> [N, E].

    An observed-features gate is rolled out as served: it selects with `select` (default: top-k) and
    observes the selected experts' scores of each realised token."""
    gate.eval()
    docs = list(range(corpus.n_docs)) if docs is None else list(docs)
    if not gate.uses_observations:
        return torch.cat([gate(corpus.context[corpus.doc_rows(d)][None])[0][0] for d in docs]) if docs else \
            torch.zeros(0, gate.args.n_experts)
    select = select or top_k_rule(k)
    out = []
    for i in range(0, len(docs), batch):
        part = docs[i:i + batch]
        rows = corpus.rows(part)
        lengths = [corpus.doc_offsets[d + 1] - corpus.doc_offsets[d] for d in part]
        sig = corpus_signals(corpus.ids[rows], corpus.lps[rows], corpus.targets[rows], gate.args.vocab_size)
        logits = rollout(gate, pad_rows(corpus.context[rows], lengths), padded_signals(sig, lengths), select)
        out += [logits[b, :n] for b, n in enumerate(lengths)]
    return torch.cat(out) if out else torch.zeros(0, gate.args.n_experts)


def adaptive_logprob(corpus: ScoredCorpus, logits: torch.Tensor, ks: torch.Tensor, vocab_size: int,
                     space: str) -> torch.Tensor:
    """log p_mix(target) [N] when row n is routed to its top-ks[n] experts (Mixtral weights)."""
    out = torch.empty(len(ks))
    for k in ks.unique().tolist():
        rows = (ks == k).nonzero()[:, 0]
        out[rows] = gated_logprob(corpus.ids[rows], corpus.lps[rows], corpus.targets[rows], logits[rows], k,
                                  vocab_size, space)
    return out


def adaptive_sweep(gate: Gate, corpus: ScoredCorpus, vocab_size: int, space: str,
                   thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)) -> list[dict]:
    """Quality against expert steps per token for the adaptive rule (k in [1, 3]) at several thresholds."""
    out = []
    for tau in thresholds:
        def select(lg, tau=tau):
            return selection_mask(lg, adaptive_k(lg, tau))

        logits = gate_logits_for(gate, corpus, select=select)
        ks = adaptive_k(logits, tau)
        out.append({"threshold": tau, "perplexity": ppl(adaptive_logprob(corpus, logits, ks, vocab_size, space)),
                    "steps_per_token": round(float(ks.float().mean()), 3),
                    "k_share": {int(k): round(float((ks == k).float().mean()), 3) for k in (1, 2, 3)}})
    return out


def pair_shares(logits: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Share of positions whose top-2 experts are each unordered pair ("code+math"), most frequent first.

    Where engines share a core (the CPU demo pins two per core), a pair on one core steps one after the other."""
    top = logits.topk(2, dim=-1).indices.sort(dim=-1).values                  # [N, 2]
    pairs, counts = top.unique(dim=0, return_counts=True)
    total = max(int(counts.sum()), 1)
    order = counts.argsort(descending=True, stable=True)
    return {f"{names[int(pairs[i, 0])]}+{names[int(pairs[i, 1])]}": int(counts[i]) / total for i in order}


def ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.mean()))


@torch.no_grad()
def evaluate(
    corpus: ScoredCorpus, vocab_size: int, space: str, gate: Gate | None = None, router: DocRouter | None = None,
    generalist: ScoredCorpus | None = None, adaptive: tuple[float, ...] | None = None,
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
        for k in (1, 2, 3)[: len(corpus.expert_names)]:
            logits_k = gate_logits_for(gate, corpus, k=k)            # an observed gate routes differently per k
            result[f"gate_top{k}"] = ppl(gated_logprob(corpus.ids, corpus.lps, corpus.targets, logits_k, k, vocab_size, space))
            if k == 2:
                logits = logits_k
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
        if len(corpus.expert_names) >= 2:
            summary["gate_top2_pairs"] = pair_shares(logits, corpus.expert_names)
        if adaptive is not None:
            sweep = adaptive_sweep(gate, corpus, vocab_size, space, thresholds=adaptive)
            summary["adaptive"] = sweep
        if "generalist" in result:
            summary["gate_top2_vs_generalist"] = result["gate_top2"] / result["generalist"]
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
    if "gate_top2_pairs" in summary:
        lines.append("gate top-2 pairs: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["gate_top2_pairs"].items()))
    if "gate_top2_vs_generalist" in summary:
        lines.append(f"gate_top2 ÷ generalist: {summary['gate_top2_vs_generalist']:.3f}")
    for row in summary.get("adaptive", []):
        lines.append(f"adaptive k (threshold {row['threshold']}): perplexity {row['perplexity']:.2f}, "
                     f"{row['steps_per_token']:.2f} expert steps/token, k share {row['k_share']}")
    return "\n".join(lines)
