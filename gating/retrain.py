"""Retrain the gate on logged traffic: build sequences, split by request, score, fit from the live gate,
compare on the held-out slice, and promote only if the new gate is better (unless forced).

Nothing here writes a checkpoint until the new gate is complete; an interrupted run leaves the live
version untouched (GateRegistry writes are atomic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from experts.protocol import Expert, ExpertInfo
from gating.checkpoint import GateCheckpoint, GateRegistry
from gating.routing_stats import oracle_share, routing_stats
from gating.scores import ScoredCorpus
from gating.train import FitArgs, evaluate_nll, fit_gate


class RetrainError(ValueError):
    """The log cannot be used for retraining; the message says why and what to do."""


@dataclass(frozen=True)
class RetrainOptions:
    # Sampled completions that nobody rated come from the live gate itself; training on them teaches the
    # gate to agree with itself (a feedback loop), so they are left out unless asked for.
    include_unrated_completions: bool = False
    min_rating: int = 1
    heldout_fraction: float = 0.2
    # Early stopping picks an epoch on its own slice of the training requests, so the held-out comparison
    # that decides promotion is not also the set the new gate was selected on.
    validation_fraction: float = 0.15
    doc_tokens: int = 512
    epochs: int = 8
    top_logprobs: int = 20
    seed: int = 0
    force: bool = False


@dataclass(frozen=True)
class Sequence:
    request_id: str
    tokens: tuple[int, ...]
    source: str            # "prompt" | "feedback" | "completion"


def check_log(records: list, expert_names: list[str], log_fingerprint: str | None, fingerprint: str) -> None:
    if not records:
        raise RetrainError("the traffic log has no requests yet; serve some traffic first")
    named = {e for r in records for step in r.routing_experts for e in step}
    unknown = sorted(named - set(expert_names))
    if unknown:
        raise RetrainError(
            f"the log names experts that are not configured any more: {', '.join(unknown)} "
            f"(configured: {', '.join(expert_names)}); filter the log with --since or restore those experts"
        )
    if log_fingerprint is not None and log_fingerprint != fingerprint:
        raise RetrainError(
            f"the log was written with tokenizer {log_fingerprint[:12]} but the experts use {fingerprint[:12]}; "
            "its token ids cannot be scored by these experts"
        )


def build_sequences(records: Iterable, feedback: Iterable, opts: RetrainOptions, encode) -> list[Sequence]:
    """Prompts of served requests, plus completions rated >= min_rating (corrected text wins), deduplicated."""
    by_id = {r.request_id: r for r in records if r.error is None and r.prompt_ids}
    out: list[Sequence] = [Sequence(r.request_id, tuple(r.prompt_ids), "prompt") for r in by_id.values()]
    rated: set[str] = set()
    for fb in feedback:
        r = by_id.get(fb.request_id)
        if r is None or fb.rating < opts.min_rating:
            continue
        completion = tuple(encode(fb.corrected_text)) if fb.corrected_text else tuple(r.output_ids)
        out.append(Sequence(r.request_id, tuple(r.prompt_ids) + completion, "feedback"))
        rated.add(r.request_id)
    if opts.include_unrated_completions:
        out += [Sequence(r.request_id, tuple(r.prompt_ids) + tuple(r.output_ids), "completion")
                for r in by_id.values() if r.request_id not in rated and r.output_ids]
    seen, unique = set(), []
    for s in out:
        key = hashlib.sha1(repr(s.tokens[: opts.doc_tokens]).encode()).digest()
        if key not in seen and len(s.tokens) >= 2:
            seen.add(key)
            unique.append(Sequence(s.request_id, s.tokens[: opts.doc_tokens], s.source))
    return unique


def split_by_request(seqs: list[Sequence], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train / held-out sequences; all sequences of one request land on the same side."""
    from sklearn.model_selection import GroupShuffleSplit

    groups = [s.request_id for s in seqs]
    if len(set(groups)) < 2:
        raise RetrainError(f"need at least 2 distinct requests to hold one out, found {len(set(groups))}")
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train, held = next(splitter.split(seqs, groups=groups))
    return sorted(train.tolist()), sorted(held.tolist())


def three_way_split(seqs: list[Sequence], opts: RetrainOptions) -> tuple[list[int], list[int], list[int]]:
    """-> (fit, validation, held-out) indices, all split by request. Too few requests to carve out a
    validation slice: validate on the fit requests (early stopping is then only a guard against divergence)."""
    train, held = split_by_request(seqs, opts.heldout_fraction, opts.seed)
    if len({seqs[i].request_id for i in train}) < 8:
        return train, train, held
    fit, val = split_by_request([seqs[i] for i in train], opts.validation_fraction, opts.seed + 1)
    return [train[i] for i in fit], [train[i] for i in val], held


async def retrain(
    experts: dict[str, Expert], info: ExpertInfo, registry: GateRegistry, seqs: list[Sequence], opts: RetrainOptions,
    score: Callable[[list[list[int]]], Awaitable[ScoredCorpus]] | None = None,
) -> tuple[dict, GateCheckpoint | None, ScoredCorpus]:
    """-> (result summary, the new checkpoint if promoted, the scored corpus). `info`: any expert's (shared).
    `score` replaces the in-process scoring loop (e.g. gating.ray_data_scoring for large logs)."""
    from gating.scores import score_sequences

    current = registry.load_current()
    current.check_matches(list(experts), info.tokenizer_fingerprint)
    train_idx, val_idx, held_idx = three_way_split(seqs, opts)
    sequences = [list(s.tokens) for s in seqs]
    if score is None:
        corpus = await score_sequences(experts, sequences, opts.top_logprobs, desc="scoring traffic")
    else:
        corpus = await score(sequences)
    fit = FitArgs(k=current.top_k, space=current.mix_space, epochs=opts.epochs, seed=opts.seed, patience=opts.epochs)
    old_gate = current.build()
    old_nll = evaluate_nll(old_gate, corpus, fit, info.vocab_size, held_idx)
    # Fine-tune from the live gate; early stopping sees only the validation requests, never the held-out ones.
    new_gate, history = fit_gate(corpus, train_idx, val_idx, current.args, fit, info.vocab_size,
                                 init_state=current.state_dict)
    new_nll = evaluate_nll(new_gate, corpus, fit, info.vocab_size, held_idx)
    better = new_nll < old_nll - 1e-4
    promote = better or opts.force
    version = registry.next_version()
    held_tokens = sum(len(seqs[i].tokens) - 1 for i in held_idx)
    result = {
        "old_version": current.version, "new_version": version if promote else current.version,
        "promoted": promote, "train_sequences": len(seqs) - len(held_idx),
        "heldout_tokens": held_tokens,
        "heldout_nll_old": round(old_nll, 5), "heldout_nll_new": round(new_nll, 5),
        # Where the data says the weight belongs (per-token oracle expert) and where each gate puts it.
        "heldout_oracle_share": oracle_share(corpus, info.vocab_size, held_idx),
        "routing_old": routing_stats(old_gate, corpus, fit.k, info.vocab_size, held_idx),
        "routing_new": routing_stats(new_gate, corpus, fit.k, info.vocab_size, held_idx),
    }
    ckpt = None
    if promote:
        ckpt = GateCheckpoint(version, current.args, new_gate.state_dict(), current.expert_names,
                              current.tokenizer_fingerprint, current.top_k, current.mix_space,
                              parent=current.version, metrics={**result, "epochs_run": len(history["train_nll"])})
        registry.add(ckpt, promote=True, reason="forced" if (opts.force and not better) else "retrain: better")
    return result, ckpt, corpus
