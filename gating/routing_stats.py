"""How a gate routes a scored corpus, next to what the data says it should do (pure, no experts called).

The data's verdict per position is the oracle: the expert that gives the actual next token the highest
probability. A gate routes the way the data says when its weight lands on that expert.
"""

from __future__ import annotations

import torch

from gating.evaluate import gate_logits_for
from gating.mix import gate_weights
from gating.model import Gate
from gating.objective import single_expert_logprob
from gating.scores import ScoredCorpus


def weight_per_expert(experts: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """experts/weights [N, S] (gate_weights) -> dense [N, E] routing weights (0 for unselected experts)."""
    return torch.zeros(experts.shape[0], n_experts).scatter_add_(1, experts, weights)


def oracle_experts(corpus: ScoredCorpus, vocab_size: int, rows: torch.Tensor) -> torch.Tensor:
    """Per row: index of the expert that gives the actual next token the highest probability."""
    return single_expert_logprob(corpus.ids[rows], corpus.lps[rows], corpus.targets[rows], vocab_size).argmax(-1)


@torch.no_grad()
def routing_stats(gate: Gate, corpus: ScoredCorpus, k: int, vocab_size: int, docs: list[int] | None = None) -> dict:
    """-> {"expert_share": {name: share of routing weight}, "oracle_weight": mean weight on the oracle expert}.

    Both are averages over the positions of `docs` (all documents by default).
    """
    docs = docs if docs is not None else list(range(corpus.n_docs))
    rows = corpus.rows(docs)
    experts, weights = gate_weights(gate_logits_for(gate, corpus, docs), k)
    dense = weight_per_expert(experts, weights, len(corpus.expert_names))          # [N, E]
    oracle = oracle_experts(corpus, vocab_size, rows)
    return {
        "expert_share": {n: round(float(dense[:, e].mean()), 4) for e, n in enumerate(corpus.expert_names)},
        "oracle_weight": round(float(dense.gather(1, oracle[:, None]).mean()), 4),
    }


def oracle_share(corpus: ScoredCorpus, vocab_size: int, docs: list[int] | None = None) -> dict[str, float]:
    """Share of positions on which each expert is the oracle: where the data says the weight belongs."""
    rows = corpus.rows(docs if docs is not None else list(range(corpus.n_docs)))
    counts = torch.bincount(oracle_experts(corpus, vocab_size, rows), minlength=len(corpus.expert_names))
    return {n: round(float(counts[e]) / len(rows), 4) for e, n in enumerate(corpus.expert_names)}
