"""PNG report for retraining: the gate's top-1 expert share per prompt cluster, before and after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gating.checkpoint import GateRegistry, load_checkpoint
from gating.doc_router import bag_of_tokens
from gating.evaluate import gate_logits_for
from gating.scores import ScoredCorpus


def cluster_documents(corpus: ScoredCorpus, vocab_size: int, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfTransformer

    x = TfidfTransformer().fit_transform(bag_of_tokens(corpus.sequences, vocab_size))
    k = max(1, min(k, corpus.n_docs))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)


def shares(corpus: ScoredCorpus, gate, clusters: np.ndarray) -> np.ndarray:
    """-> [clusters, experts] share of tokens whose top-1 gate choice is each expert."""
    top1 = gate_logits_for(gate, corpus).argmax(-1)                              # [N]
    c = torch.as_tensor(clusters)[corpus.doc]                                      # [N]
    n_c, n_e = int(clusters.max()) + 1, len(corpus.expert_names)
    counts = torch.zeros(n_c, n_e).index_put_((c, top1), torch.ones(len(top1)), accumulate=True)
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()


def share_report(corpus: ScoredCorpus, registry: GateRegistry, result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = load_checkpoint(registry.path_of(result["old_version"]))
    new = load_checkpoint(registry.path_of(result["new_version"]))
    clusters = cluster_documents(corpus, old.args.vocab_size, len(corpus.expert_names))
    before, after = shares(corpus, old.build(), clusters), shares(corpus, new.build(), clusters)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, data, title in ((axes[0], before, old.version), (axes[1], after, new.version)):
        bottom = np.zeros(len(data))
        for e, name in enumerate(corpus.expert_names):
            ax.bar(range(len(data)), data[:, e], bottom=bottom, label=name)
            bottom += data[:, e]
        ax.set_title(f"gate {title}")
        ax.set_xticks(range(len(data)))
        ax.set_xlabel("prompt cluster (k-means over the prompts' tokens)")
    axes[0].set_ylabel("top-1 expert share of tokens")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
