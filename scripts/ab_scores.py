"""The score blocks of another revision against this tree's, on the bench model, interleaved.

    python scripts/ab_scores.py REV [--batches 1 8] [--repeats 5] [--score-self attention|duplication]

Loads `model/scores.py` as it was at git revision REV, and times an ATP prefill of
`python -m pipeline bench`'s model (packed layout, ATP calibrated to N_bar 25%) with REV's score
functions and with this tree's, alternating in one process: per batch size, the ATP modules' share
of the prefill (`model.pruning_clock`) and the prefill time, median [min, max] of the repeats after
one warm-up round, and the largest difference of the two versions' scores on the same prompts.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import scores  # noqa: E402
from model.pruning import PruningClock  # noqa: E402
from pipeline.eval import bench  # noqa: E402


def scores_at(rev: str):
    """REV's `redundancy_scores` (its helpers come with it: they are its module's)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:model/scores.py"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    mod = types.ModuleType("scores_at_rev")
    exec(compile(src.stdout, f"{rev}:model/scores.py", "exec"), mod.__dict__)
    fn = mod.redundancy_scores
    if "seq_weight" in inspect.signature(fn).parameters:
        return fn

    def before_seq_weight(*args, seq_weight, **kwargs):  # revisions that scatter the weights themselves
        return fn(*args, **kwargs)

    return before_seq_weight


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-self", default="attention", choices=["attention", "duplication"])
    a = ap.parse_args(argv)
    versions = {a.rev: scores_at(a.rev), "this tree": scores.redundancy_scores}
    shape = bench.parser().parse_args(["--batches", *map(str, a.batches)])  # the bench's model
    m = bench.build(shape)
    from model import attention, pruning

    def select(name):  # the two callers' names (AtpPruning binds its partial at each forward)
        attention.redundancy_scores = pruning.redundancy_scores = versions[name]

    with torch.no_grad():
        select("this tree")
        bench.calibrate_atp(
            m, shape, bench.methods(shape, shape.grid**2)["atp 25%"] | {"score_self": a.score_self}, "packed"
        )
        m.pruning_clock = clock = PruningClock()
        print(f"bench model, score_self {a.score_self}, packed, ATP ~25%, {torch.get_num_threads()} threads")
        for B in a.batches:
            inputs = bench.prompts(shape, B)
            seen = {}
            for name in versions:
                select(name)
                seen[name] = m(**inputs, logits_to_keep=1).atp_info["thresholds"]
            diff = (seen[a.rev] - seen["this tree"]).abs().max().item()
            res = {name: ([], []) for name in versions}
            for r in range(a.repeats + 1):
                for name in versions:
                    select(name)
                    clock.seconds, t = 0.0, time.perf_counter()
                    m(**inputs, logits_to_keep=1)
                    dt = time.perf_counter() - t
                    if r:  # round 0: warm-up
                        res[name][0].append(clock.seconds / dt)
                        res[name][1].append(dt * 1e3)
            for name, (share, ms) in res.items():
                sh = f"{statistics.median(share):.2%} [{min(share):.2%}, {max(share):.2%}]"
                print(
                    f"batch {B}, {name}: ATP share {sh}, "
                    f"prefill {statistics.median(ms):.0f} ms [{min(ms):.0f}, {max(ms):.0f}]"
                )
            print(f"batch {B}: thresholds, largest difference between the versions {diff:.1e}")


if __name__ == "__main__":
    main()
