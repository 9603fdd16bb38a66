"""The per-document router baseline (as in RouteLLM / c-BTM): one expert for a whole document.

A scikit-learn classifier on bag-of-token features, trained on the gate's data with the label "the
expert with the lowest NLL on this document". It sees the whole document, so it is a generous baseline.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import csr_matrix
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from gating.objective import single_expert_logprob
from gating.scores import ScoredCorpus


def bag_of_tokens(sequences: list[list[int]], vocab_size: int) -> csr_matrix:
    rows = np.concatenate([np.full(len(s), i) for i, s in enumerate(sequences)])
    cols = np.concatenate([np.asarray(s) for s in sequences])
    return csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(sequences), vocab_size))


def best_expert_per_doc(corpus: ScoredCorpus, vocab_size: int) -> np.ndarray:
    lp = single_expert_logprob(corpus.ids, corpus.lps, corpus.targets, vocab_size)   # [N, E]
    per_doc = torch.zeros(corpus.n_docs, lp.shape[1]).index_add_(0, corpus.doc, lp)   # [D, E]
    return per_doc.argmax(1).numpy()


@dataclass
class DocRouter:
    expert_names: list[str]
    vocab_size: int
    model: object

    @classmethod
    def fit(cls, corpus: ScoredCorpus, vocab_size: int, seed: int = 0) -> DocRouter:
        labels = best_expert_per_doc(corpus, vocab_size)
        if len(set(labels.tolist())) == 1:      # degenerate data: always the one expert
            model = ("constant", int(labels[0]))
        else:
            model = make_pipeline(TfidfTransformer(), LogisticRegression(max_iter=2000, C=4.0, random_state=seed))
            model.fit(bag_of_tokens(corpus.sequences, vocab_size), labels)
        return cls(list(corpus.expert_names), vocab_size, model)

    def predict(self, sequences: list[list[int]]) -> np.ndarray:
        if isinstance(self.model, tuple):
            return np.full(len(sequences), self.model[1])
        return self.model.predict(bag_of_tokens(sequences, self.vocab_size))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> DocRouter:
        return pickle.loads(Path(path).read_bytes())
