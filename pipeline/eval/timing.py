"""Honest timings, shared by `pipeline.eval.bench` and the evaluation report (`pipeline.eval.evaluate`).

The things compared run interleaved in one process (each repeat runs every one once, in an order
rotated per repeat, so drift from other jobs spreads over all of them), after warm-up; a number is
the median of the repeats with its [min, max]; a ratio is the median of the per-repeat ratios (the
two runs of one repeat saw the same load), marked noisy when those spread more than SPREAD_MARK.
"""

from __future__ import annotations

import statistics
import time
from typing import TypedDict

MIN_REPEATS = 5  # fewer repeats than this are not published (the report says so)
SPREAD_MARK = 0.10  # a ratio whose per-repeat values spread more than this around its median is marked


def interleaved(fns, repeats, warmup=1):
    """{name: [seconds]}: every repeat runs each fn once, in an order rotated per repeat. A fn that
    returns a float reports its own time (e.g. decode steps after an untimed prefill); otherwise its
    wall time counts."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            own = fns[n]()
            times[n].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


class SpreadStats(TypedDict):
    median_s: float
    min_s: float
    max_s: float
    spread: float  # (max - min) / median


class RatioStats(TypedDict):
    ratio: float  # the median of the per-repeat ratios
    min: float
    max: float
    spread: float  # (max - min) / ratio
    noisy: bool  # spread > SPREAD_MARK


def spread_stats(ts) -> SpreadStats:
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "spread": (max(ts) - min(ts)) / med}


def ratio_stats(ts, base) -> RatioStats:
    """Median of the per-repeat ratios ts[r] / base[r], their [min, max] and spread; `noisy` when the
    spread exceeds SPREAD_MARK."""
    rs = [t / b for t, b in zip(ts, base)]
    med = statistics.median(rs)
    spread = (max(rs) - min(rs)) / med
    return {"ratio": med, "min": min(rs), "max": max(rs), "spread": spread, "noisy": spread > SPREAD_MARK}


def fmt_time(st, unit=1e3):
    return f"{st['median_s'] * unit:.1f} [{st['min_s'] * unit:.1f}, {st['max_s'] * unit:.1f}]"


def fmt_ratio(r):
    """`0.512 [0.498, 0.530]`, with `~` appended when the ratio is noisy."""
    return f"{r['ratio']:.3f} [{r['min']:.3f}, {r['max']:.3f}]{'~' if r['noisy'] else ' '}"
