"""orchestrator.sample.sample_round: a round's plain top-2 rows draw together from the pair-mix arrays
(draw_pairs), the others row by row; every row must get exactly what sample_row gives it from the same generator
state, so that a seed's text does not depend on how many other sequences share its rounds."""

import math

import numpy as np
import pytest

from gating.mix_row import mix_round
from orchestrator.sample import draw_pairs, make_rng, nth_free, sample_round, sample_row
from orchestrator.types import GenerationParams
from tests.unit.test_mix_pair import pair_rows
from tests.unit.test_mix_row import packed, random_row

VOCAB = 4096


def per_row(mixed, params, seeds):
    """What sample_row gives each row of the round, with a fresh generator from its seed."""
    out = []
    for j, (p, seed) in enumerate(zip(params, seeds)):
        row = mixed.row(j)
        token = sample_row(row, p.temperature, p.top_p, p.top_k, make_rng(seed))
        out.append((token, row.logprob_of(token)))
    return out


def round_of(n: int, seed: int, space: str = "probs"):
    rows = pair_rows(20, VOCAB, n, seed=seed)[:n]
    return mix_round(packed([t for t, _ in rows]), [w for _, w in rows], VOCAB, [space] * n)


@pytest.mark.parametrize("space", ["probs", "logits"])
@pytest.mark.parametrize("temperature", [0.3, 0.8, 1.0, 2.5])
def test_the_batched_draw_gives_every_row_what_sample_row_gives_it(space, temperature):
    tail_draws = 0
    for draw in range(40):
        mixed = round_of(16, seed=100 + draw, space=space)
        assert len(mixed.pairs) == 1                                     # the rows are held as arrays
        params = [GenerationParams(temperature=temperature)] * 16
        seeds = [1000 * draw + j for j in range(16)]
        got = sample_round(mixed, params, [make_rng(s) for s in seeds])
        assert got == per_row(mixed, params, seeds)
        tail_draws += sum(1 for j, (token, _) in enumerate(got) if token not in mixed.row(j).ids)
    if temperature >= 1.0:
        assert tail_draws > 0                                            # the tail branch was exercised


@pytest.mark.parametrize("space", ["probs", "logits"])
def test_a_round_of_one_expert_rows_draws_together_and_gives_every_row_what_sample_row_gives_it(space):
    tail_draws = 0
    for draw in range(30):
        tops = []
        for r in range(12):
            ids, lps, _ = random_row(7000 + 31 * draw + r, 1, 20, VOCAB, 0, peaked=r % 3 == 0)
            tops.append([(ids[0].tolist(), lps[0].tolist())])
        mixed = mix_round(packed(tops), [(1.0,)] * 12, VOCAB, [space] * 12)
        assert len(mixed.pairs) == 1                                     # the top-1 rows are held as arrays
        params = [GenerationParams(temperature=1.0 + 0.1 * (j % 4)) for j in range(12)]
        seeds = [900 * draw + j for j in range(12)]
        got = sample_round(mixed, params, [make_rng(s) for s in seeds])
        assert got == per_row(mixed, params, seeds)
        tail_draws += sum(1 for j, (token, _) in enumerate(got) if token not in mixed.row(j).ids)
    assert tail_draws > 0                                                # the tail branch was exercised


def test_rows_with_top_p_top_k_or_greedy_in_a_pair_round_are_sampled_row_by_row_and_agree():
    mixed = round_of(7, seed=7)
    params = [GenerationParams(temperature=0.0), GenerationParams(temperature=0.9, top_p=0.5),
              GenerationParams(temperature=0.9, top_k=3), GenerationParams(temperature=1.3, top_k=60)]
    params += [GenerationParams(temperature=0.7 + 0.1 * j) for j in range(len(mixed) - len(params))]
    seeds = list(range(50, 50 + len(mixed)))
    assert sample_round(mixed, params, [make_rng(s) for s in seeds]) == per_row(mixed, params, seeds)


def test_a_generator_advances_as_sample_row_advances_it():
    """The next draw from each row's generator is the same after either path: a request's later tokens do not
    depend on which path drew its earlier ones."""
    mixed = round_of(12, seed=11)
    params = [GenerationParams(temperature=1.5)] * 12
    a, b = [make_rng(s) for s in range(12)], [make_rng(s) for s in range(12)]
    sample_round(mixed, params, a)
    for j, g in enumerate(b):
        sample_row(mixed.row(j), 1.5, 1.0, 0, g)
    assert [g.random() for g in a] == [g.random() for g in b]


def test_draw_pairs_picks_the_slot_where_the_cumulative_weight_first_passes_u():
    lps = np.log(np.array([[0.5, 0.2, 0.1, 0.2]]))
    keep = np.array([[True, True, False, True]])                         # slot 2 is not a candidate
    no_tail = (np.array([-np.inf]), np.array([0]))                      # weights 5/9, 2/9, 2/9
    for u, slot in [(0.0, 0), (0.55, 0), (0.56, 1), (0.77, 1), (0.78, 3), (0.999999, 3)]:
        assert draw_pairs(lps, keep, *no_tail, np.array([1.0]), np.array([u])).tolist() == [slot], u
    lps = np.log(np.array([[0.45, 0.225, 0.1, 0.225]]))                  # candidates 0.9 in all
    tail = (np.array([math.log(0.1 / 10)]), np.array([10]))            # ten tail tokens, 0.1 in all
    for u, slot in [(0.44, 0), (0.5, 1), (0.85, 3), (0.95, -1)]:
        assert draw_pairs(lps, keep, *tail, np.array([1.0]), np.array([u])).tolist() == [slot], u


def test_nth_free_is_draw_outsides_mapping():
    gen = np.random.default_rng(0)
    for _ in range(300):
        vocab = int(gen.integers(5, 80))
        ids = gen.choice(vocab, size=int(gen.integers(1, min(vocab, 12))), replace=False)
        keep = gen.random(len(ids)) < 0.8
        keep[0] = True
        taken = sorted(ids[keep].tolist())
        index = int(gen.integers(0, vocab - len(taken)))
        expected = [t for t in range(vocab) if t not in taken][index]
        assert nth_free(ids[None], keep[None], np.array([index])).tolist() == [expected]


def test_a_uniform_rounded_up_to_the_total_takes_the_last_weighted_candidate_when_there_is_no_tail():
    lps = np.log(np.array([[0.5, 0.3, 0.2, 0.0001], [0.5, 0.3, 0.2, 0.0001]]))
    keep = np.array([[True, True, True, False], [True, True, True, True]])
    no_tail = (np.full(2, -np.inf), np.zeros(2, dtype=np.int64))
    assert draw_pairs(lps, keep, *no_tail, np.ones(2), np.ones(2)).tolist() == [2, 3]
