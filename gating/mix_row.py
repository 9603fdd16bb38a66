"""The served form of gating.mix.mix: one RowMix (plain Python floats) per sequence of a decode round.

A served token mixes a handful of experts' top-k (2 × 20 values for top-2). Done as ~45 batched torch ops for
one row, each op's dispatch costs more than its arithmetic: 0.33 ms on an idle core of this machine, about
0.9 ms inside a busy gateway replica, once per generated token at concurrency 1. The same rule over Python
floats (`mix_row`) takes 0.05 ms a row. A round's top-2 rows (two experts each, the served default) are mixed at
once, however few (gating/mix_pair.py, compiled: 22 µs for 32 rows on an idle core, against 0.81 ms in torch;
8-13 µs for one, against 52-65 row by row), and so are its one-expert rows (top-1), as pairs of an expert
with itself at weight 0, and kept as arrays in the round's RoundMix, which the sampler reads as they are (orchestrator/sample.py `sample_round`); a row's RowMix is
built only when something asks for it (a request's `top_logprobs`, top_p or top_k). Other rows, from
SMALL_ROUND rows on, go through one batched torch mix. All compute in float64 and agree to ~1e-12, so a seed's text
does not depend on which path its rounds took (how many other sequences were running).

The rule is gating.mix's, step for step (its module docstring explains the floor and the cross-listed guess);
training and `ensemble eval` use the torch form in float32. tests/unit/test_mix_row.py checks the three
against each other over random rows in both spaces, with and without the cross-listed guess;
tests/unit/test_mix_pair.py the numpy pair mix against mix_row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, compress

import numpy as np
import torch

from experts.protocol import TopK, joined
from gating.mix import CROSS_LISTED_INTERP, MIN_LEFTOVER, MIX_SPACES, Mixed, mix
from gating.mix_pair import PairMix, mix_pair_arrays

NEG_INF = float("-inf")
SMALL_ROUND = 12     # rows up to which row by row beats one batched torch mix (measured: equal at about 12)
Tops = Sequence[tuple[Sequence[int], Sequence[float]]]     # per selected expert: (ids [K], logprobs [K])
RoundTops = Sequence[Sequence[TopK]]                        # per row, per selected expert: its packed top-k


@dataclass(frozen=True)
class RowMix:
    """A mixed next-token distribution over the whole vocabulary: the distinct candidates, plus every other token
    (the tail, `tail_count` of them) at one logprob each."""
    ids: tuple[int, ...]            # distinct candidate ids, in first-listed order (expert by expert, by rank)
    logprobs: tuple[float, ...]     # normalised log p_mix of each candidate
    tail_logprob: float             # log p_mix of any single token outside the candidates
    tail_count: int                 # vocab_size - len(ids)
    vocab_size: int

    def logprob_of(self, token: int) -> float:
        for t, lp in zip(self.ids, self.logprobs):
            if t == token:
                return lp
        return self.tail_logprob

    def alternatives(self, n: int) -> tuple[tuple[int, float], ...]:
        """The n most likely (token id, logprob) pairs, for `top_logprobs` (ties: the first listed)."""
        if n <= 0:
            return ()
        best = sorted(range(len(self.ids)), key=self.logprobs.__getitem__, reverse=True)[:n]
        return tuple((self.ids[i], self.logprobs[i]) for i in best)


def rows_of(mixed: Mixed, vocab_size: int) -> list[RowMix]:
    """Every row of a batched torch mix: its distinct candidates in first-listed order, and its tail."""
    rows = []
    for ids, lps, firsts, tail in zip(mixed.cand_ids.tolist(), mixed.cand_logprobs.tolist(), mixed.first.tolist(),
                                      mixed.tail_logprob.tolist()):
        distinct = tuple(compress(ids, firsts))
        rows.append(RowMix(distinct, tuple(compress(lps, firsts)), tail, vocab_size - len(distinct), vocab_size))
    return rows


def logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(sum([math.exp(x - top) for x in xs]))


def log_sum_exp_weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    """log Σ wᵢ·exp(vᵢ), directly (values are logprobs: no overflow; float64 keeps a logprob down to -745),
    with the max-shifted form only when every term underflows."""
    total = sum([w * math.exp(v) for w, v in zip(weights, values)])
    if total > 0:
        return math.log(total)
    return logsumexp([v + math.log(w) for w, v in zip(weights, values)])


@dataclass
class RoundMix:
    """One round's mixes: row j of the round is either a RowMix already, or row r of a PairMix group (kept as
    arrays, so that a sampler can draw for the whole group at once; `row(j)` builds its RowMix on demand)."""
    vocab_size: int
    rows: list[RowMix | None]                              # [J] None: the row lives in a pair group
    pairs: list[tuple[list[int], PairMix]]                 # (the round's rows of the group, its arrays)
    where: dict[int, tuple[int, int]]                      # round row -> (pair group, row in the group)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, j: int) -> RowMix:
        got = self.rows[j]
        if got is None:
            g, r = self.where[j]
            pm = self.pairs[g][1]
            ids, lps = pm.candidates(r)
            got = self.rows[j] = RowMix(tuple(ids), tuple(lps), float(pm.tail[r]), int(pm.n_tail[r]),
                                        self.vocab_size)
        return got


def mix_rows(tops: RoundTops, weights: Sequence[Sequence[float]], vocab_size: int,
             spaces: Sequence[str]) -> list[RowMix]:
    """One round's mixes as RowMix objects (mix_round, every row materialised)."""
    mixed = mix_round(tops, weights, vocab_size, spaces)
    return [mixed.row(j) for j in range(len(mixed))]


def mix_round(tops: RoundTops, weights: Sequence[Sequence[float]], vocab_size: int,
              spaces: Sequence[str]) -> RoundMix:
    """One round's mixes: row i mixes tops[i] (its answering experts' top-k, as the experts sent them) with
    weights[i] in spaces[i].

    Rows are grouped by (number of experts, K, space). A group of two-expert rows (top-2, the served default)
    or of one-expert rows (top-1), from one row on, is mixed at once by the compiled pair mix and kept as arrays
    (gating/mix_pair.py, _pair_arrays); any other group row by row in Python while the round has up to
    SMALL_ROUND rows, else in one float64 torch mix."""
    groups: dict[tuple[int, int, str], list[int]] = {}
    for i, (t, space) in enumerate(zip(tops, spaces)):
        groups.setdefault((len(t), min(x.k for x in t), space), []).append(i)
    out = RoundMix(vocab_size, [None] * len(tops), [], {})
    for (s, k, space), members in groups.items():
        if s <= 2:
            out.where.update((i, (len(out.pairs), r)) for r, i in enumerate(members))
            out.pairs.append((members, _pair_arrays(tops, weights, members, s, k, vocab_size, space)))
        elif len(tops) <= SMALL_ROUND:
            for i in members:
                out.rows[i] = mix_row([(x.token_ids, x.logprobs) for x in tops[i]], weights[i], vocab_size, space)
        else:
            for i, row in zip(members, _torch_rows(tops, weights, members, k, vocab_size, space)):
                out.rows[i] = row
    return out


def _pair_arrays(tops: RoundTops, weights: Sequence[Sequence[float]], members: list[int], s: int, k: int,
                 vocab_size: int, space: str) -> PairMix:
    """A group of rows of s = 2 experts, or of one (top-1, or a top-2 row left with one expert), as a PairMix.
    A one-expert row is mixed as the pair of that expert with itself at weight 0: every candidate is listed by
    both, so nothing is guessed, the second's slots are not candidates, and the mix is the expert's own top-k
    and floor, normalised, as mix_row gives it (tests/unit/test_mix_pair.py)."""
    n = len(members)
    ids, lps, w = _group_arrays(tops, weights, members, k)
    ids, lps, w = ids.reshape(n, s, k), lps.reshape(n, s, k), w.reshape(n, s)
    if s == 1:
        ids, lps, w = np.concatenate([ids, ids], 1), np.concatenate([lps, lps], 1), np.hstack([w, np.zeros((n, 1))])
    return mix_pair_arrays(ids, lps, w, vocab_size, space)


def _torch_rows(tops: RoundTops, weights: Sequence[Sequence[float]], members: list[int], k: int,
                vocab_size: int, space: str) -> list[RowMix]:
    shape = (len(members), len(tops[members[0]]))
    ids, lps, w = _group_arrays(tops, weights, members, k)
    with torch.inference_mode():
        mixed = mix(torch.from_numpy(ids).view(*shape, k),                                # [R, S, K]
                    torch.from_numpy(lps).view(*shape, k),
                    torch.from_numpy(w).view(shape), vocab_size, space)  # type: ignore[arg-type]
        return rows_of(mixed, vocab_size)


def _group_arrays(tops: RoundTops, weights: Sequence[Sequence[float]], members: list[int],
                  k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group's ids, logprobs (each expert's first k) and weights as flat int64 / float64 arrays (rows with the
    same number of experts). The top-k arrive packed (experts/protocol.py TopK): when every expert sent exactly k
    (k is the group's smallest, so the joined length tells), the group's ids are one bytes join read as one array
    (about 20 µs for a round of 32 top-2 rows, weights included, against 90 µs for np.fromiter over the same rows
    as Python tuples, measured side by side); otherwise each is cut to k first."""
    every = [x for i in members for x in tops[i]]
    n = len(every)
    ids, lps = joined(every)
    if len(ids) != n * k:
        ids = np.concatenate([x.id_array[:k] for x in every])
        lps = np.concatenate([x.lp_array[:k] for x in every])
    return (ids.astype(np.int64), lps.astype(np.float64),
            np.fromiter(chain.from_iterable(weights[i] for i in members), np.float64, n))


def mix_row(tops: Tops, weights: Sequence[float], vocab_size: int,
            space: str = "logits", *, interp: float | None = None) -> RowMix:
    """Mix S experts' top-k for one position. tops: per selected expert (ids [K], logprobs [K] descending, ids
    unique); weights [S] summing to 1. Same rule and arguments as gating.mix.mix (K: the smallest expert's)."""
    k = min(len(ids) for ids, _ in tops)
    if any(len(ids) != k for ids, _ in tops):
        tops = [(ids[:k], lps[:k]) for ids, lps in tops]
    if space not in MIX_SPACES:
        raise ValueError(f"mix space must be one of {MIX_SPACES}, got {space!r}")
    interp = CROSS_LISTED_INTERP if interp is None else interp
    listed = [dict(zip(ids, lps)) for ids, lps in tops]
    order = list(dict.fromkeys([t for ids, _ in tops for t in ids]))            # the distinct candidates
    by_active: set[int] = set()                                                  # listed by a weighted expert
    for w, lists in zip(weights, listed):
        if w > 0:
            by_active.update(lists)
    values: list[list[float]] = []                                               # [S][C]
    floors: list[float] = []                                                     # [S]
    for (_, lps), own in zip(tops, listed):
        leftover = max(1.0 - sum([math.exp(x) for x in lps]), MIN_LEFTOVER)
        floor = math.log(leftover) - math.log(max(vocab_size - k, 1))
        if interp <= 0:
            values.append([own.get(t, floor) for t in order])
            floors.append(floor)
            continue
        raised = by_active.difference(own)                # likely tokens this expert did not list
        guess = floor + interp * max(lps[-1] - floor, 0.0)
        guess = min(guess, math.log(0.5 * leftover / max(len(raised), 1)))
        rest = max(leftover - len(raised) * math.exp(guess), MIN_LEFTOVER)
        new_floor = math.log(rest) - math.log(max(vocab_size - k - len(raised), 1))
        value_of = {**dict.fromkeys(raised, guess), **own} if raised else own
        values.append([value_of.get(t, new_floor) for t in order])
        floors.append(new_floor)
    if space == "logits":                                                        # Σ wᵢ·logpᵢ
        score = [sum([w * v for w, v in zip(weights, column)]) for column in zip(*values)]
        tail = sum([w * f for w, f in zip(weights, floors)])
    else:                                                                        # log Σ wᵢ·pᵢ
        w = [max(x, 1e-30) for x in weights]
        score = [log_sum_exp_weighted(column, w) for column in zip(*values)]
        tail = log_sum_exp_weighted(floors, w)
    n_tail = max(vocab_size - len(order), 0)
    tail_mass = tail + math.log(n_tail) if n_tail > 0 else NEG_INF
    log_z = logsumexp([*score, tail_mass])
    return RowMix(tuple(order), tuple(s - log_z for s in score), tail - log_z, n_tail, vocab_size)
