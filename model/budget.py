"""Visual-token budgets (METHOD sec 7): the one home of N_bar and of the counts that meet it.

A pruning point i (0 = before the first decoder layer, i = before layer i) starts a group of
layers; group 0 (the layers before the first point) sees all Lv visual tokens, group g the
count kept after point g. N_bar is the visual tokens per decoder layer, averaged over all N
layers. This file is copied into exported checkpoints (trust_remote_code): stdlib and torch only.
"""

from __future__ import annotations

import functools

import torch

# paper Table 2: ATP-LLaVA keeps [126, 88, 20] of 576 at I = [4, 14, 24] (N_bar 143.9)
TABLE2_RATIOS = (126.0, 88.0, 20.0)


def group_spans(layers, num_layers: int) -> list[int]:
    """Layers in each group: [layers[0], layers[1] - layers[0], ..., num_layers - layers[-1]]."""
    bounds = [0, *layers, num_layers]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def tokens_per_layer(group_counts, layers, num_layers: int) -> torch.Tensor:
    """[B, N] visual tokens each decoder layer attends over, from each group's count [B]
    (group_counts[0]: the tokens before the first pruning point)."""
    spans = group_spans(layers, num_layers)
    return torch.cat([c[:, None].expand(-1, s) for c, s in zip(group_counts, spans)], 1)


def n_bar(layers, counts, num_layers: int, lv: float) -> float:
    """N_bar of kept `counts` after the pruning points `layers` (Lv before layers[0])."""
    return sum(s * c for s, c in zip(group_spans(layers, num_layers), [lv, *counts])) / num_layers


def keep_share_per_module(atp_layers, num_layers: int, num_visual: int, target_tokens: float) -> float:
    """The share q each module keeps of its input so that N_bar equals the target when every
    module keeps the same share (counts Lv q, Lv q^2, ...), clamped to [0.02, 0.98]."""

    def geometric_n_bar(q):
        return n_bar(atp_layers, [num_visual * q ** (k + 1) for k in range(len(atp_layers))], num_layers, num_visual)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if geometric_n_bar(mid) < target_tokens else (lo, mid)
    return min(max((lo + hi) / 2, 0.02), 0.98)


def default_ratios(k: int) -> list[float]:
    """Relative counts for k pruning points: paper Table 2's decreasing shape 126 / 88 / 20,
    read as a piecewise-linear curve over [0, 1] (126 at 0, 88 at 1/2, 20 at 1) sampled at k
    evenly spaced points: k = 3 gives 126 / 88 / 20 exactly, k = 2 gives 126 / 20, k = 1 gives 1."""
    if k == 1:
        return [1.0]
    a, b, c = TABLE2_RATIOS
    out = []
    for i in range(k):
        t = i / (k - 1)
        out.append(a + (b - a) * 2 * t if t <= 0.5 else b + (c - b) * (2 * t - 1))
    return out


def counts_for_budget(layers, num_layers: int, lv: int, share: float, ratios=None) -> list[int]:
    """Kept visual tokens after each pruning point in `layers` (0 = before the first decoder
    layer, i = before layer i) such that N_bar (METHOD sec 7) is as close to share * Lv as integer
    counts allow. Counts follow `ratios` (relative counts between the pruning points; default
    `default_ratios`: paper Table 2's 126 / 88 / 20 shape), each in [1, Lv] and non-increasing (a
    pruned token never comes back). The scale is solved continuously, rounded, then single counts
    are moved by +-1 while that brings N_bar closer, so |N_bar - target| <= (shortest group's
    span) / (2 N) <= 0.5 token unless a bound is hit.

    counts_for_budget([4, 14, 24], 32, 576, 143.875 / 576, [126, 88, 20]) == [126, 88, 20].
    Raises ValueError if the budget cannot be met: the layers before layers[0] see all Lv tokens.
    """
    layers = [int(i) for i in layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers={layers}: need strictly increasing indexes in [0, {num_layers - 1}]")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share}: need 0 < share <= 1 (target N_bar / Lv)")
    ratios = default_ratios(len(layers)) if ratios is None else [float(r) for r in ratios]
    if len(ratios) != len(layers) or min(ratios) <= 0:
        raise ValueError(f"ratios={ratios}: need one positive ratio per pruning layer {layers}")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios={ratios}: must not increase (a pruned token never comes back)")
    spans = group_spans(layers, num_layers)[1:]  # the groups after each pruning point
    target = share * lv * num_layers  # visual-token-layers
    budget = target - layers[0] * lv
    if budget < sum(spans) - 0.5 * min(spans):
        floor = n_bar(layers, [1] * len(layers), num_layers, lv)
        raise ValueError(
            f"share={share} (N_bar {share * lv:.2f} of Lv {lv}) is out of reach with pruning at {layers}: "
            f"the {layers[0]} layers before the first pruning point alone give N_bar >= {floor:.2f}"
        )
    top = ratios[0]
    rel = [r / top for r in ratios]

    def cont(scale):
        return [min(max(scale * r, 1.0), float(lv)) for r in rel]

    lo, hi = 0.0, float(lv) / rel[-1]
    for _ in range(100):  # sum(span * clamp(scale * r)) is monotone in scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(s * x for s, x in zip(spans, cont(mid))) < budget else (lo, mid)
    real = cont((lo + hi) / 2)
    counts = [min(max(round(x), 1), lv) for x in real]
    for k in range(1, len(counts)):
        counts[k] = min(counts[k], counts[k - 1])

    def err(c):
        return abs(budget - sum(s * x for s, x in zip(spans, c)))

    while True:  # integer refinement: one count +-1 at a time, while N_bar gets closer
        moves = []
        for k in range(len(counts)):
            for d in (-1, 1):
                c = list(counts)
                c[k] += d
                if 1 <= c[k] <= lv and not (k and c[k] > c[k - 1]) and not (k + 1 < len(c) and c[k + 1] > c[k]):
                    moves.append((err(c), abs(c[k] - real[k]) / max(real[k], 1.0), c))
        best = min(moves, default=None, key=lambda m: m[:2])
        if best is None or best[0] >= err(counts) - 1e-9:
            return counts
        counts = best[2]


def module_counts(config) -> tuple[int, ...]:
    """The schedule of `budget_loss: per_module` (METHOD sec 13): counts_for_budget at the config's
    target, shared by the threshold start, the loss and the export calibration."""
    lv = config.num_visual_tokens
    return _counts_cached(tuple(config.atp_layers), config.text_config.num_hidden_layers, lv, config.target_tokens / lv)


@functools.lru_cache(maxsize=64)
def _counts_cached(layers: tuple, num_layers: int, lv: int, share: float) -> tuple[int, ...]:
    return tuple(counts_for_budget(list(layers), num_layers, lv, share))  # once per setting: the loss asks every step
