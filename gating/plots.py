"""PNG plots of routing: which expert the gate picks along a document."""

from __future__ import annotations

from pathlib import Path

import torch

from gating.evaluate import gate_logits_for
from gating.model import Gate
from gating.scores import ScoredCorpus


def plot_routing(corpus: ScoredCorpus, gate: Gate, out: Path, docs: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = torch.softmax(gate_logits_for(gate, corpus), -1)                       # [N, E]
    n = min(docs, corpus.n_docs)
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.2 * n), squeeze=False)
    for d in range(n):
        p = probs[corpus.doc_rows(d)].numpy()
        ax = axes[d][0]
        ax.stackplot(range(len(p)), p.T, labels=corpus.expert_names)
        ax.set_xlim(0, len(p) - 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"doc {d}")
    axes[0][0].legend(loc="upper right", ncol=len(corpus.expert_names), fontsize=8)
    axes[-1][0].set_xlabel("token position (gate probability per expert)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
