"""Fit the gate on teacher-forced expert scores: minimise the NLL of the actual next token under the
served mixture (same mix function, same k, same space), plus a dense auxiliary term against collapse.

Shape legend: B = documents in a batch, T = positions, E = experts, K = top-k, N = valid positions.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from gating.model import Gate, GateArgs
from gating.objective import gated_logprob, single_expert_logprob
from gating.rollout import corpus_signals, padded_signals, rollout, top_k_rule
from gating.scores import ScoredCorpus


@dataclass(frozen=True)
class FitArgs:
    k: int = 2
    space: str = "logits"
    epochs: int = 12
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_docs: int = 16
    # Only the 2 selected logits get gradient from the served loss (Mixtral's rule), so the gate would
    # never learn about experts it does not already pick. The dense term mixes all experts by the full
    # softmax (in probability space, where each expert is already normalised, so it needs no candidate
    # union and is cheap), which gives every gate logit a gradient; it is the regulariser against collapse.
    dense_weight: float = 0.5
    patience: int = 3
    seed: int = 0
    # Positions per document used for fitting (the gate is a recurrent net: cost grows with length).
    max_positions: int = 512
    # Observed-features gates: share of training documents whose first rows (a random prompt length) carry
    # no observations, as when serving a prompt; evaluation and echo observe from the first token on.
    prompt_share: float = 0.3

    def __post_init__(self) -> None:
        assert self.k >= 1 and self.epochs >= 1 and self.batch_docs >= 1, "k, epochs, batch_docs must be >= 1"
        assert self.space in ("logits", "probs"), "space must be 'logits' or 'probs'"


def _batch(corpus: ScoredCorpus, docs: list[int], max_positions: int):
    """Pad the documents' gate inputs; return (tokens [B, T], mask [B, T], row index [N] into the corpus)."""
    lengths = [min(corpus.doc_offsets[d + 1] - corpus.doc_offsets[d], max_positions) for d in docs]
    t = max(lengths)
    tokens = torch.zeros(len(docs), t, dtype=torch.long)
    mask = torch.zeros(len(docs), t, dtype=torch.bool)
    rows = []
    for b, (d, n) in enumerate(zip(docs, lengths)):
        start = corpus.doc_offsets[d]
        tokens[b, :n] = corpus.context[start:start + n]
        mask[b, :n] = True
        rows.append(torch.arange(start, start + n))
    return tokens, mask, torch.cat(rows)


def batch_nll(gate: Gate, corpus: ScoredCorpus, docs: list[int], fit: FitArgs, vocab_size: int,
              prompt_rng: random.Random | None = None):
    """-> (served NLL sum, dense NLL sum, positions). With `prompt_rng` (training), a share of the documents
    starts with a random prompt the experts were not stepped on, as in serving (no observations there)."""
    tokens, mask, rows = _batch(corpus, docs, fit.max_positions)
    ids, lps, tgt = corpus.ids[rows], corpus.lps[rows], corpus.targets[rows]
    sig, prompt = None, None
    if gate.uses_observations:
        lengths = mask.sum(1).tolist()
        sig = padded_signals(corpus_signals(ids, lps, tgt, vocab_size), lengths)
        if prompt_rng is not None:
            prompt = torch.tensor([prompt_rng.randrange(n) if prompt_rng.random() < fit.prompt_share else 0
                                   for n in lengths])
    logits = rollout(gate, tokens, sig, top_k_rule(fit.k), prompt)       # [B, T, E]
    logits = logits[mask]                                               # [N, E], same order as rows
    served = gated_logprob(ids, lps, tgt, logits, fit.k, vocab_size, fit.space)
    single = single_expert_logprob(ids, lps, tgt, vocab_size)            # [N, E], no gradient needed
    dense = torch.logsumexp(torch.log_softmax(logits, -1) + single, dim=-1)  # log Σ_e g_e · p_e(target)
    return -served.sum(), -dense.sum(), len(rows)


@torch.no_grad()
def evaluate_nll(gate: Gate, corpus: ScoredCorpus, fit: FitArgs, vocab_size: int, docs: list[int] | None = None) -> float:
    """Served NLL per token (nats) over the given documents."""
    gate.eval()
    docs = list(range(corpus.n_docs)) if docs is None else docs
    total, n = 0.0, 0
    for i in range(0, len(docs), 32):
        nll, _, count = batch_nll(gate, corpus, docs[i:i + 32], fit, vocab_size)
        total, n = total + float(nll), n + count
    return total / max(n, 1)


def fit_gate(
    corpus: ScoredCorpus, train_docs: list[int], val_docs: list[int], args: GateArgs, fit: FitArgs,
    vocab_size: int, init_state: dict | None = None, progress: bool = True,
) -> tuple[Gate, dict]:
    """Train from `init_state` (or scratch); keep the epoch with the best validation NLL."""
    # The gate's ops are tiny: extra OpenMP threads only add barrier spinning, which under load (vLLM
    # engines on the same cores) made each batch ~100x slower here. One thread is faster.
    torch.set_num_threads(1)
    torch.manual_seed(fit.seed)
    order_rng = random.Random(fit.seed)
    gate = Gate(args)
    if init_state is not None:
        gate.load_state_dict(init_state)
    opt = torch.optim.AdamW(gate.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    best = (evaluate_nll(gate, corpus, fit, vocab_size, val_docs), copy.deepcopy(gate.state_dict()), 0)
    history = {"val_nll": [best[0]], "train_nll": [], "fit": asdict(fit)}
    bad_epochs = 0
    bar = tqdm(range(fit.epochs), desc="fitting gate", disable=not progress)
    for epoch in bar:
        gate.train()
        docs = list(train_docs)
        order_rng.shuffle(docs)
        total, n = 0.0, 0
        for i in range(0, len(docs), fit.batch_docs):
            served, dense, count = batch_nll(gate, corpus, docs[i:i + fit.batch_docs], fit, vocab_size, order_rng)
            loss = (served + fit.dense_weight * dense) / count
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gate.parameters(), 1.0)
            opt.step()
            total, n = total + float(served.detach()), n + count
        val = evaluate_nll(gate, corpus, fit, vocab_size, val_docs)
        history["train_nll"].append(total / max(n, 1))
        history["val_nll"].append(val)
        bar.set_postfix(train_ppl=f"{math.exp(total / max(n, 1)):.1f}", val_ppl=f"{math.exp(val):.1f}")
        if val < best[0] - 1e-4:
            best, bad_epochs = (val, copy.deepcopy(gate.state_dict()), epoch + 1), 0
        else:
            bad_epochs += 1
            if bad_epochs >= fit.patience:
                break
    gate.load_state_dict(best[1])
    history["best_epoch"], history["best_val_nll"] = best[2], best[0]
    return gate.eval(), history
