"""Teacher-forced top-k scores of token sequences by every expert, as dense tensors, with an on-disk cache.

Scoring goes through the expert deployments (Expert.score), batched, so what the gate is trained on is
what the served engines compute. Shape legend: N = positions, E = experts, K = top-k per expert.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from experts.answer_checks import score_problem
from experts.protocol import Expert, ScoreOutput


@dataclass
class ScoredCorpus:
    """Positions of many documents, flattened. Row j predicts token j+1 of its document."""

    expert_names: list[str]
    ids: torch.Tensor        # [N, E, K] long
    lps: torch.Tensor        # [N, E, K] float
    targets: torch.Tensor    # [N] long, the actual next token
    context: torch.Tensor    # [N] long, the token the row has just seen (input to the gate at this position)
    doc: torch.Tensor        # [N] long, document index
    doc_offsets: list[int]   # start row of each document (len D + 1)
    sequences: list[list[int]]

    @property
    def n_docs(self) -> int:
        return len(self.sequences)

    def doc_rows(self, d: int) -> slice:
        return slice(self.doc_offsets[d], self.doc_offsets[d + 1])

    def rows(self, docs: list[int]) -> torch.Tensor:
        """Row indices of these documents, in this order -> [N] long."""
        parts = [torch.arange(self.doc_offsets[d], self.doc_offsets[d + 1]) for d in docs]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def documents(self, docs: list[int]) -> ScoredCorpus:
        """The corpus of just these documents, in this order (renumbered 0..len(docs) - 1)."""
        rows = self.rows(docs)
        lengths = torch.tensor([self.doc_offsets[d + 1] - self.doc_offsets[d] for d in docs], dtype=torch.long)
        return ScoredCorpus(self.expert_names, self.ids[rows], self.lps[rows], self.targets[rows], self.context[rows],
                            torch.repeat_interleave(torch.arange(len(docs)), lengths),
                            [0, *torch.cumsum(lengths, 0).tolist()], [self.sequences[d] for d in docs])


def stack_scores(outs: list[ScoreOutput]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence scored by E experts -> ids [N, E, K], lps [N, E, K], targets [N] (N = T - 1)."""
    k = min(len(row) for o in outs for row in o.topk_ids) if outs[0].topk_ids else 0
    ids = torch.tensor([[row[:k] for row in o.topk_ids] for o in outs], dtype=torch.long).permute(1, 0, 2)
    lps = torch.tensor([[row[:k] for row in o.topk_logprobs] for o in outs], dtype=torch.float32).permute(1, 0, 2)
    targets = torch.tensor(outs[0].token_ids[1:], dtype=torch.long)
    return ids.reshape(len(targets), len(outs), k), lps.reshape(len(targets), len(outs), k), targets


async def score_sequences(
    experts: dict[str, Expert], sequences: list[list[int]], top_k: int, *, batch: int = 16, desc: str = "scoring"
) -> ScoredCorpus:
    """Score every sequence with every expert: one batched call per expert per `batch` sequences."""
    names = list(experts)
    per_doc: list[list[ScoreOutput]] = []
    with tqdm(total=sum(len(s) for s in sequences) * len(names), desc=desc, unit="tok", unit_scale=True) as bar:
        for start in range(0, len(sequences), batch):
            chunk = sequences[start:start + batch]
            results = await asyncio.gather(*(experts[n].score(chunk, top_k) for n in names))   # [E][B]
            per_doc += per_document(names, chunk, results)
            bar.update(sum(len(s) for s in chunk) * len(names))
    return assemble(names, sequences, per_doc)


def per_document(names: list[str], chunk: list[list[int]], results: list[list[ScoreOutput]]) -> list[list[ScoreOutput]]:
    """[E][B] outputs of one batched call per expert -> [B][E], raising on the first expert error."""
    per_doc = []
    for i, seq in enumerate(chunk):
        outs = [results[e][i] for e in range(len(names))]
        for n, o in zip(names, outs):
            if o.error:
                raise RuntimeError(f"expert {n} could not score a sequence of {len(seq)} tokens: {o.error}")
            problem = score_problem(o.topk_ids, o.topk_logprobs, None)
            if problem is not None:         # e.g. a corrupt checkpoint's NaN: it would poison every fit
                raise RuntimeError(f"expert {n} answered a sequence of {len(seq)} tokens unsoundly: {problem}")
        per_doc.append(outs)
    return per_doc


def assemble(names: list[str], sequences: list[list[int]], per_doc: list[list[ScoreOutput]]) -> ScoredCorpus:
    ids, lps, targets, context, doc, offsets = [], [], [], [], [], [0]
    for d, (seq, outs) in enumerate(zip(sequences, per_doc)):
        i, l, t = stack_scores(outs)
        ids.append(i), lps.append(l), targets.append(t)
        context.append(torch.tensor(seq[:-1], dtype=torch.long))
        doc.append(torch.full((len(t),), d, dtype=torch.long))
        offsets.append(offsets[-1] + len(t))
    return ScoredCorpus(
        names, torch.cat(ids), torch.cat(lps), torch.cat(targets), torch.cat(context), torch.cat(doc), offsets,
        [list(s) for s in sequences],
    )


def scoring_tag(configs: list, tokenizer_fingerprint: str) -> str:
    """Everything cached scores of these experts depend on besides the tokens and k: the tokenizer, and per expert
    its checkpoint files (experts.checkpoint.checkpoint_identity) and the engine settings that change its numbers.
    Scores cached before an expert's checkpoint was rewritten, or its dtype or kernels changed, are not reused."""
    from experts.checkpoint import checkpoint_identity

    parts = [tokenizer_fingerprint] + [
        [c.name, checkpoint_identity(c.model_path), c.dtype, c.enforce_eager,
         c.engine_args().get("ir_op_priority"), c.engine_kwargs] for c in configs]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(names: list[str], sequences: list[list[int]], top_k: int, tag: str) -> str:
    """File name of a cached scoring; `tag` is the experts' scoring_tag."""
    h = hashlib.sha256(json.dumps([names, top_k, tag]).encode())
    for s in sequences:
        h.update(np.asarray(s, dtype=np.int32).tobytes() + b"|")
    return h.hexdigest()[:16]


def save_scored(corpus: ScoredCorpus, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, ids=corpus.ids.numpy().astype(np.int32), lps=corpus.lps.numpy().astype(np.float32),
        targets=corpus.targets.numpy(), context=corpus.context.numpy(), doc=corpus.doc.numpy(),
        offsets=np.asarray(corpus.doc_offsets), names=np.asarray(corpus.expert_names),
        flat=np.concatenate([np.asarray(s, dtype=np.int64) for s in corpus.sequences]),
        lengths=np.asarray([len(s) for s in corpus.sequences]),
    )
    tmp.replace(path)


def load_scored(path: Path) -> ScoredCorpus:
    z = np.load(path)
    flat, lengths = z["flat"], z["lengths"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seqs = [flat[bounds[i]:bounds[i + 1]].tolist() for i in range(len(lengths))]
    return ScoredCorpus(
        [str(n) for n in z["names"]], torch.from_numpy(z["ids"].astype(np.int64)), torch.from_numpy(z["lps"]),
        torch.from_numpy(z["targets"]), torch.from_numpy(z["context"]), torch.from_numpy(z["doc"]),
        z["offsets"].tolist(), seqs,
    )
