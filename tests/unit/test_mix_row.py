"""gating.mix_row (the served, per-row form of the mix) against gating.mix (the batched torch form training
and `ensemble eval` use): the same distribution, candidate by candidate and for the tail."""

import math

import pytest
import torch

from experts.protocol import TopK
from gating.mix import logprob_of, mix
from gating.mix_row import mix_row, rows_of


def packed(tops):
    """A round's rows as mix_round takes them: per row, per expert, the TopK an expert sends (float64 logprobs:
    the values are kept exactly)."""
    return [[TopK.of(ids, lps) for ids, lps in row] for row in tops]


def random_row(seed: int, s: int, k: int, vocab: int, shared: int, peaked: bool = False):
    """S experts' top-k over `vocab` (descending logprobs, ids unique per expert), `shared` tokens favoured by
    all of them (so listed by several), and gate weights."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randperm(vocab, generator=g)[:shared]
    scale = 4.0 if peaked else 1.5                             # peaked: the top-k holds most of the mass
    ids, lps = [], []
    for _ in range(s):
        logits = torch.randn(vocab, generator=g) * scale
        logits[common] += 2 * scale
        values, own = torch.log_softmax(logits, 0).topk(k)
        ids.append(own)
        lps.append(values)
    weights = torch.softmax(torch.randn(s, generator=g), 0)
    return torch.stack(ids), torch.stack(lps), weights


CASES = [(seed, s, k, vocab, shared, peaked)
         for seed, (s, k, vocab, shared, peaked) in enumerate([
             (2, 20, 4096, 0, False), (2, 20, 4096, 7, False), (2, 20, 4096, 20, False), (1, 20, 4096, 0, False),
             (3, 8, 50, 3, False), (2, 6, 48, 2, True), (4, 5, 30, 1, False), (2, 20, 4096, 5, True)])]


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("interp", [None, 0.0])
@pytest.mark.parametrize(("seed", "s", "k", "vocab", "shared", "peaked"), CASES)
def test_a_row_is_the_batched_mix(seed, s, k, vocab, shared, peaked, space, interp):
    ids, lps, weights = random_row(seed, s, k, vocab, shared, peaked)
    ref = rows_of(mix(ids[None], lps[None], weights[None], vocab, space, interp=interp), vocab)[0]
    row = mix_row([(i.tolist(), v.tolist()) for i, v in zip(ids, lps)], weights.tolist(), vocab, space,
                  interp=interp)
    assert row.ids == ref.ids and row.tail_count == ref.tail_count == vocab - len(set(ids.flatten().tolist()))
    assert max(abs(a - b) for a, b in zip(row.logprobs, ref.logprobs)) < 2e-5       # float32 against float64
    assert row.tail_logprob == pytest.approx(ref.tail_logprob, abs=2e-5)
    total = sum(math.exp(v) for v in row.logprobs) + row.tail_count * math.exp(row.tail_logprob)
    assert total == pytest.approx(1.0, abs=1e-12)


def test_weights_one_zero_give_the_first_expert_and_a_cross_listed_guess_only_from_weighted_experts():
    ids, lps, _ = random_row(3, 2, 8, 50, 2, peaked=True)          # the k-th logprob above the floor
    tops = [(i.tolist(), v.tolist()) for i, v in zip(ids, lps)]
    row = mix_row(tops, [1.0, 0.0], 50, "logits")
    for t, v in zip(*tops[0]):
        assert row.logprob_of(t) == pytest.approx(v, abs=1e-9)
    only_second = next(t for t in tops[1][0] if t not in tops[0][0])
    assert row.logprob_of(only_second) == pytest.approx(row.tail_logprob, abs=1e-12)
    mixed = mix_row(tops, [0.5, 0.5], 50, "logits")
    plain = mix_row(tops, [0.5, 0.5], 50, "logits", interp=0.0)
    assert mixed.logprob_of(only_second) > plain.logprob_of(only_second)


def test_reported_logprobs_and_alternatives_match_the_batched_mix():
    ids, lps, weights = random_row(11, 2, 20, 4096, 4)
    mixed = mix(ids[None], lps[None], weights[None], 4096, "probs")
    row = mix_row([(i.tolist(), v.tolist()) for i, v in zip(ids, lps)], weights.tolist(), 4096, "probs")
    for t in [*ids.flatten().tolist()[:10], 4095 if 4095 not in row.ids else 0]:
        assert row.logprob_of(t) == pytest.approx(float(logprob_of(mixed, torch.tensor([t]))[0]), abs=2e-5)
    values, idx = mixed.cand_logprobs[0].topk(5)
    assert [t for t, _ in row.alternatives(5)] == mixed.cand_ids[0][idx].tolist()
    assert [v for _, v in row.alternatives(5)] == pytest.approx(values.tolist(), abs=2e-5)
    assert row.alternatives(0) == ()


def test_an_unknown_space_is_refused():
    with pytest.raises(ValueError, match="mix space"):
        mix_row([([1, 2], [-0.5, -1.5])], [1.0], 10, "log")


def test_a_round_mixes_the_same_row_by_row_and_batched():
    """mix_rows takes the batched torch path above SMALL_ROUND rows (the compiled pair mix for one- and two-expert
    groups): every row comes out as mix_row gives it alone (float64 every way), whatever the other rows' expert
    counts and spaces, so a seed's text does not depend on how many sequences share its rounds."""
    from gating.mix_row import SMALL_ROUND, mix_rows

    tops, weights, spaces = [], [], []
    for r in range(SMALL_ROUND * 2 + 3):
        s = 1 + r % 3
        ids, lps, w = random_row(100 + r, s, 20, 4096, r % 6, peaked=r % 2 == 0)
        tops.append([(i.tolist(), v.tolist()) for i, v in zip(ids, lps)])
        weights.append(w.tolist())
        spaces.append("probs" if r % 4 == 1 else "logits")
    tops[5][0] = (tops[5][0][0][:12], tops[5][0][1][:12])          # an expert that answered fewer than K
    alone = [mix_row(t, w, 4096, space) for t, w, space in zip(tops, weights, spaces)]
    batched = mix_rows(packed(tops), weights, 4096, spaces)
    small = mix_rows(packed(tops[:SMALL_ROUND]), weights[:SMALL_ROUND], 4096, spaces[:SMALL_ROUND])
    assert len(batched) > SMALL_ROUND
    for a, b in [*zip(batched, alone), *zip(small, alone)]:
        assert a.ids == b.ids and a.tail_count == b.tail_count
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-12
        assert a.tail_logprob == pytest.approx(b.tail_logprob, abs=1e-12)
    three = [j for j in range(SMALL_ROUND) if len(tops[j]) == 3]     # three experts: row by row, exactly
    assert three and [small[j] for j in three] == [alone[j] for j in three]
