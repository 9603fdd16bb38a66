"""gating.mix_pair (a round of top-2 rows mixed at once in numpy) against gating.mix_row (one row in Python floats,
itself checked against the torch form in test_mix_row.py): the same candidates in the same order, the same
logprobs and tail, to float64 rounding."""

import math

import numpy as np
import pytest
import torch

from gating.mix_pair import mix_pairs
from gating.mix_row import mix_row, mix_rows
from tests.unit.test_mix_row import packed, random_row


def pair_rows(k: int, vocab: int, n: int, seed: int):
    """n two-expert rows over `vocab` sharing from none to all of their favoured tokens, flat and peaked, with
    the weights (1, 0) and (0, 1) among them; then one row with identical and one with disjoint candidates."""
    rows = []
    for r in range(n):
        ids, lps, w = random_row(seed + r, 2, k, vocab, shared=(r * 3) % (k + 1), peaked=r % 2 == 1)
        weights = [(1.0, 0.0), (0.0, 1.0)][r] if r < 2 else tuple(w.tolist())
        rows.append(([(i.tolist(), v.tolist()) for i, v in zip(ids, lps)], weights))
    identical = rows[-1][0][0]
    rows.append(([identical, (identical[0], [v - 0.1 for v in identical[1]])], (0.3, 0.7)))   # same ids
    lps = [rows[-1][0][0][1], rows[-1][0][1][1]]
    rows.append(([(list(range(k)), lps[0]), (list(range(k, 2 * k)), lps[1])], (0.6, 0.4)))    # disjoint ids
    return rows


def as_arrays(rows):
    ids = np.array([[e[0] for e in tops] for tops, _ in rows], dtype=np.int64)
    lps = np.array([[e[1] for e in tops] for tops, _ in rows], dtype=np.float64)
    return ids, lps, np.array([w for _, w in rows], dtype=np.float64)


def tolerance(tops) -> float:
    """Float64 rounding, and more where an expert's top-k holds all but a sliver of its mass: its floor then
    comes from 1 - Σp, and one ulp of difference between numpy's exp and math.exp is 1e-16 / leftover of it."""
    leftover = min(1.0 - sum(math.exp(v) for v in lps) for _, lps in tops)
    return 1e-12 + 1e-15 / max(leftover, 1e-6)


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("interp", [None, 0.0])
@pytest.mark.parametrize(("k", "vocab"), [(20, 4096), (8, 50), (5, 10)])    # (5, 10): disjoint rows fill the vocab
def test_every_row_of_a_pair_mix_is_mix_row(k, vocab, space, interp):
    rows = pair_rows(k, vocab, 12, seed=7 * k)
    cand, logps, tails = mix_pairs(*as_arrays(rows), vocab, space, interp=interp)
    assert len(cand) == len(rows)
    for (tops, w), c, lp, tail in zip(rows, cand, logps, tails):
        ref = mix_row(tops, w, vocab, space, interp=interp)
        assert tuple(c) == ref.ids
        tol = tolerance(tops)
        assert max(abs(a - b) for a, b in zip(lp, ref.logprobs)) < tol
        if ref.tail_count:
            assert tail == pytest.approx(ref.tail_logprob, abs=tol)
        total = sum(math.exp(v) for v in lp) + ref.tail_count * math.exp(tail)
        assert total == pytest.approx(1.0, abs=1e-12)
    assert any(len(c) == vocab for c in cand) == (vocab == 2 * k)          # the tail-free case was exercised


def test_a_round_of_top2_rows_takes_the_pair_mix_and_gives_what_each_row_gives_alone(monkeypatch):
    """mix_rows sends each group of one- or two-expert rows of one K, however small, to the compiled pair mix
    (counted), whatever else the round holds, and every row still equals mix_row's."""
    import gating.mix_row as mix_row_module

    calls = []
    real = mix_row_module.mix_pair_arrays
    monkeypatch.setattr(mix_row_module, "mix_pair_arrays",
                        lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    rows = pair_rows(20, 4096, 4, seed=300)
    tops, weights = [t for t, _ in rows], [w for _, w in rows]
    one = random_row(999, 1, 20, 4096, 0)
    tops.append([(one[0][0].tolist(), one[1][0].tolist())])           # a top-1 row in the same round
    weights.append((1.0,))
    tops[3] = [(ids[:12], lps[:12]) for ids, lps in tops[3]]            # experts that answered fewer than K
    spaces = ["probs"] * len(tops)
    mixed = mix_rows(packed(tops), weights, 4096, spaces)
    assert sorted(calls) == [1, 1, len(rows) - 1]      # row 3 (K=12) and the top-1 row are groups of their own
    for got, t, w in zip(mixed, tops, weights):
        ref = mix_row(t, w, 4096, "probs")
        assert got.ids == ref.ids and got.tail_count == ref.tail_count
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) < 1e-12
        assert got.tail_logprob == pytest.approx(ref.tail_logprob, abs=1e-12)


def test_an_unknown_space_is_refused():
    ids, lps, w = as_arrays(pair_rows(5, 50, 1, seed=1))
    with pytest.raises(ValueError, match="mix space"):
        mix_pairs(ids, lps, w, 50, "log")


def test_the_pair_mix_matches_the_torch_form_training_uses():
    rows = pair_rows(20, 4096, 6, seed=40)
    ids, lps, w = as_arrays(rows)
    from gating.mix import mix
    from gating.mix_row import rows_of

    ref = rows_of(mix(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(w), 4096, "probs"), 4096)
    cand, logps, tails = mix_pairs(ids, lps, w, 4096, "probs")
    for r, c, lp, tail in zip(ref, cand, logps, tails):
        assert tuple(c) == r.ids
        assert max(abs(a - b) for a, b in zip(lp, r.logprobs)) < 1e-12
        assert tail == pytest.approx(r.tail_logprob, abs=1e-12)


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_a_round_of_one_expert_rows_takes_the_pair_mix_and_gives_what_mix_row_gives(monkeypatch, space):
    """Top-1 rows (and top-2 rows left with one expert) of a round are mixed as the pair of their expert with
    itself at weight 0: the same candidates, logprobs and tail as mix_row's one-expert mix."""
    import gating.mix_row as mix_row_module

    calls = []
    real = mix_row_module.mix_pair_arrays
    monkeypatch.setattr(mix_row_module, "mix_pair_arrays",
                        lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    tops, weights = [], []
    for r in range(6):
        ids, lps, _ = random_row(500 + r, 1, 20, 4096, 0, peaked=r % 2 == 1)
        tops.append([(ids[0].tolist(), lps[0].tolist())])
        weights.append((1.0,))
    mixed = mix_rows(packed(tops), weights, 4096, [space] * len(tops))
    assert calls == [len(tops)]
    for got, t, w in zip(mixed, tops, weights):
        ref = mix_row(t, w, 4096, space)
        assert got.ids == ref.ids and got.tail_count == ref.tail_count == 4096 - 20
        tol = tolerance(t)
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) < tol
        assert got.tail_logprob == pytest.approx(ref.tail_logprob, abs=tol)
