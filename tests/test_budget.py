"""Visual-token budgets (model/budget.py, METHOD sec 7): N_bar, tokens per layer, the solvers."""

import pytest
import torch

from model.budget import counts_for_budget, default_ratios, keep_share_per_module, n_bar, tokens_per_layer

SHARES = (0.25, 0.15, 0.11)


def test_counts_for_budget_method_sec7_and_the_budgets():
    # METHOD sec 7 / paper Table 2: I = [4, 14, 24] keeping [126, 88, 20] of 576 over 32 layers: N_bar 143.9
    counts = counts_for_budget([4, 14, 24], 32, 576, 143.875 / 576, ratios=[126, 88, 20])
    assert counts == [126, 88, 20]
    assert round(n_bar([4, 14, 24], counts, 32, 576), 1) == 143.9
    assert counts_for_budget([4, 14, 24], 32, 576, 0.25) == [126, 88, 20]  # the default shape is Table 2's
    assert default_ratios(3) == [126.0, 88.0, 20.0] and default_ratios(1) == [1.0]
    cases = [
        ([1, 5, 9], 12, 144),
        ([0], 12, 144),
        ([1], 12, 144),
        ([2], 12, 144),
        ([1, 2, 6], 12, 144),
        ([1, 13, 25], 32, 576),
        ([0], 32, 576),
        ([2], 32, 576),
        ([2, 6, 15], 32, 576),
        ([3, 7, 11, 20], 32, 576),
    ]
    for layers, N, lv in cases:
        for share in SHARES:
            if layers[0] * lv > share * lv * N:
                continue
            c = counts_for_budget(layers, N, lv, share)
            assert all(1 <= x <= lv for x in c) and c == sorted(c, reverse=True), (layers, share, c)
            assert abs(n_bar(layers, c, N, lv) - share * lv) <= 0.5, (layers, N, share, c)
    # the full layers before the first pruning point cost Lv each: ATP's [4, 14, 24] cannot reach 11% of 576
    with pytest.raises(ValueError, match="out of reach"):
        counts_for_budget([4, 14, 24], 32, 576, 0.11)
    with pytest.raises(ValueError, match="must not increase"):
        counts_for_budget([1, 5], 12, 144, 0.25, ratios=[1, 2])


def test_n_bar_tokens_per_layer_and_keep_share_agree():
    layers, N, lv = [4, 14, 24], 32, 576
    counts = [126, 88, 20]
    per_layer = tokens_per_layer([torch.tensor([float(c)]) for c in [lv, *counts]], layers, N)
    assert per_layer.mean().item() == pytest.approx(n_bar(layers, counts, N, lv))
    q = keep_share_per_module(layers, N, lv, 144.0)
    assert n_bar(layers, [lv * q ** (k + 1) for k in range(3)], N, lv) == pytest.approx(144.0, abs=1e-6)
