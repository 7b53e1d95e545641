"""The adaptivity oracle (pipeline/eval/headroom.py): an exact allocation under the budget."""

import itertools

import numpy as np
import pytest

from pipeline.eval.headroom import allocate, score, uniform_at


def _brute(correct, n_bars, groups, target):
    labels = sorted(set(groups))
    best, arg = -1, None
    for pick in itertools.product(range(len(n_bars)), repeat=len(labels)):
        alloc = dict(zip(labels, pick))
        acc, nb = score(correct, n_bars, groups, alloc, 0)
        if nb <= target + 1e-9 and acc > best + 1e-12:
            best, arg = acc, alloc
    return best, arg


def test_allocation_is_the_best_under_the_budget():
    rng = np.random.default_rng(0)
    n_bars = np.array([4.0, 9.0, 16.0, 36.0])
    for _ in range(20):
        groups = list(rng.choice(["a", "b", "c"], size=30))
        # easier with more tokens, at a rate that differs by group
        need = {"a": 0.0, "b": 10.0, "c": 30.0}
        correct = np.array([[rng.random() < min(1, 0.3 + (n - need[g] / 2) / 40) for n in n_bars] for g in groups])
        target = float(rng.uniform(5, 30))
        alloc = allocate(correct, n_bars, groups, target)
        acc, nb = score(correct, n_bars, groups, alloc, 0)
        assert nb <= target + 1e-9
        assert acc == pytest.approx(_brute(correct, n_bars, groups, target)[0])


def test_tokens_go_where_they_answer_questions():
    # group "easy" is right at any count, "hard" only with 36 tokens: at mean 20, hard gets 36
    n_bars = np.array([4.0, 36.0])
    groups = ["easy"] * 10 + ["hard"] * 10
    correct = np.array([[True, True]] * 10 + [[False, True]] * 10)
    alloc = allocate(correct, n_bars, groups, 20.0)
    assert alloc == {"easy": 0, "hard": 1}
    assert score(correct, n_bars, groups, alloc, 0) == (1.0, 20.0)
    assert uniform_at(correct.mean(0), n_bars, 20.0) == pytest.approx(0.5 + 0.5 * 16 / 32)
    with pytest.raises(ValueError, match="below the smallest share"):
        allocate(correct, n_bars, groups, 3.0)
