"""The gateway's compiled screen of a call's answers (orchestrator/answer_screen.py) passes a call exactly when
experts/answer_checks.topk_problems finds nothing in it: a screen that let an unsound answer through would let
NaN reach the mix, one that failed sound calls would only cost time (the caller asks topk_problems then)."""

import math

import numpy as np
import pytest

from experts.answer_checks import topk_problems
from experts.protocol import TopK
from orchestrator.answer_screen import all_sound
from tests.unit.test_answer_checks import UNSOUND, V, sound


@pytest.mark.parametrize("case", list(UNSOUND))
def test_one_unsound_answer_among_sound_ones_fails_the_screen(case):
    answer, _ = UNSOUND[case]
    for at in (0, 3, 7):
        block = [sound() for _ in range(8)]
        block.insert(at, answer)
        assert not all_sound(block, V)


def test_sound_answers_pass_the_screen_with_or_without_a_vocabulary():
    block = [sound(k) for k in (8,) * 16]
    assert all_sound(block, V)
    assert all_sound(block, None)
    assert all_sound([], V)


def test_answers_of_different_k_go_to_the_full_check():
    assert not all_sound([sound(8), sound(4)], V)
    assert topk_problems([sound(8), sound(4)], V) == {}


def test_the_screen_agrees_with_the_full_check_on_random_answers():
    rng = np.random.default_rng(7)
    for trial in range(400):
        n, k = int(rng.integers(1, 12)), int(rng.integers(1, 10))
        block = []
        for _ in range(n):
            lp = np.log(rng.dirichlet(np.ones(V)))
            ids = np.argsort(-lp)[:k]
            vals = lp[ids].copy()
            if rng.random() < 0.1:
                vals[rng.integers(k)] = rng.choice([math.nan, math.inf, -math.inf, 0.5, -1e-5])
            if rng.random() < 0.1:
                ids[rng.integers(k)] = rng.choice([-2, V, V + 9, ids[0]])
            if rng.random() < 0.05:
                vals = np.full(k, -1e-4)          # more than all the mass when k > 1
            block.append(TopK.of(ids, vals))
        for vocab in (V, None):
            assert all_sound(block, vocab) == (topk_problems(block, vocab) == {}), (trial, vocab)
