"""How much can instance-adaptive allocation give on a benchmark? An oracle under the `fixed` ranking.

    python -m pipeline headroom --checkpoint FIXED_EXPORT --train-shards DIR --eval-shards DIR --out DIR
        [--targets 0.25 0.15 0.11] [--shares ...] [--limit-train N] [--limit-eval N]

A model run with `pruning=fixed` (its tokens ranked by S_redundant; the untouched base measures
the benchmark, a `fixed`-trained export what that model can use) answers every question at each
of a grid of budgets (`--shares`: N_bar / Lv, counts from `counts_for_budget`). Its answers at one
share do not depend on the other samples of a batch, so one sweep gives each question's correctness
at every share, and any per-question allocation can be scored exactly from that table.

The oracle gives each group of questions its own share: by question type, by the image's number
of small shapes, and by both. Shares are chosen on the *training* questions (a multiple-choice
knapsack, solved exactly by dynamic programming: the most correct answers at mean N_bar <= target),
then applied to the eval questions, whose accuracy is compared with the uniform schedule at the
same achieved N_bar (linear interpolation of the uniform curve on the eval questions).
The headroom, the oracle's gain over uniform, is what a learned per-instance budget could win on
this benchmark with this ranking. Writes headroom.json and headroom.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SHARES = (0.02, 0.04, 0.07, 0.11, 0.15, 0.2, 0.25, 0.35, 0.5, 0.7, 1.0)
GROUPINGS = {
    "qtype": lambda s: s.qtype,
    "shapes": lambda s: f"{s.n_shapes} shapes",
    "qtype x shapes": lambda s: f"{s.qtype}, {s.n_shapes} shapes",
}


def allocate(correct: np.ndarray, n_bars: np.ndarray, groups: list[str], target: float) -> dict[str, int]:
    """Group -> share index maximising the number of correct answers with mean N_bar <= target.

    correct [n, S] bools (each sample at each share), n_bars [S] tokens, groups [n] labels. Exact
    multiple-choice knapsack over the groups; costs in 1/8 token x samples (the grid the constraint
    is checked on)."""
    labels = sorted(set(groups))
    idx = {g: np.array([i for i, x in enumerate(groups) if x == g]) for g in labels}
    unit = 8
    cap = int(np.floor(target * len(groups) * unit + 1e-9))
    NEG = -1e18
    costs = {g: np.ceil(n_bars * len(idx[g]) * unit - 1e-9).astype(int) for g in labels}  # [S] each
    best = np.full(cap + 1, NEG)
    best[0] = 0.0
    choice = []
    for g in labels:
        gain, cost = correct[idx[g]].sum(0).astype(float), costs[g]  # [S]
        new = np.full(cap + 1, NEG)
        arg = np.full(cap + 1, -1)
        for s in range(len(n_bars)):
            c = cost[s]
            if c > cap:
                continue
            cand = np.full(cap + 1, NEG)
            cand[c:] = best[: cap + 1 - c] + gain[s]
            better = cand > new
            new[better], arg[better] = cand[better], s
        best = new
        choice.append(arg)
    if best.max() <= NEG / 2:
        raise ValueError(f"target N_bar {target:.2f} is below the smallest share's N_bar {n_bars.min():.2f}")
    c = int(best.argmax())
    out = {}
    for g, arg in zip(reversed(labels), reversed(choice)):
        s = int(arg[c])
        out[g] = s
        c -= int(costs[g][s])
    return out


def score(correct: np.ndarray, n_bars: np.ndarray, groups: list[str], alloc: dict[str, int], default: int) -> tuple:
    """(accuracy, mean N_bar) of applying `alloc` (groups it lacks: share index `default`)."""
    pick = np.array([alloc.get(g, default) for g in groups])
    rows = np.arange(len(groups))
    return float(correct[rows, pick].mean()), float(n_bars[pick].mean())


def uniform_at(acc: np.ndarray, n_bars: np.ndarray, n: float) -> float:
    """The uniform schedule's accuracy at N_bar n (linear between the grid's shares)."""
    return float(np.interp(n, n_bars, acc))


@torch.no_grad()
def sweep(model, processor, samples, shares, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """correct [n, S] of the `fixed` model at each share, and each share's N_bar."""
    from tqdm import tqdm

    from model.budget import counts_for_budget, n_bar
    from pipeline.eval.answers import greedy_answers, is_correct, prompt_for

    cfg = model.config
    layers, N, lv = list(cfg.atp_layers), cfg.text_config.num_hidden_layers, cfg.num_visual_tokens
    prompts, images = [prompt_for(s.question) for s in samples], [s.image for s in samples]
    correct, n_bars = np.zeros((len(samples), len(shares)), dtype=bool), []
    for j, share in enumerate(tqdm(shares, desc="shares", unit="share")):
        cfg.fixed_counts = counts_for_budget(layers, N, lv, share)
        n_bars.append(n_bar(layers, cfg.fixed_counts, N, lv))
        preds = greedy_answers(model, processor, prompts, images, max_new_tokens=4, batch_size=batch_size)
        correct[:, j] = [is_correct(p, s.answer) for p, s in zip(preds, samples)]
        acc = correct[:, j].mean()
        log.info("share %.2f (N_bar %.1f, counts %s): accuracy %.3f", share, n_bars[-1], cfg.fixed_counts, acc)
    return correct, np.array(n_bars)


def analyse(train, eval_, c_train, c_eval, n_bars, targets, lv) -> dict:
    """The oracle of each grouping at each target, chosen on train, scored on eval."""
    uni_eval = c_eval.mean(0)
    out = {"shares_n_bar": n_bars.tolist(), "uniform_eval_accuracy": uni_eval.tolist(), "targets": {}}
    for target in targets:
        tokens = target * lv
        rows = {}
        for name, key in GROUPINGS.items():
            g_train, g_eval = [key(s) for s in train], [key(s) for s in eval_]
            alloc = allocate(c_train, n_bars, g_train, tokens)
            # a group unseen in training gets about the target
            default = min(int(np.searchsorted(n_bars, tokens)), len(n_bars) - 1)
            acc, nb = score(c_eval, n_bars, g_eval, alloc, default)
            base = uniform_at(uni_eval, n_bars, nb)
            by_qtype = defaultdict(list)
            for s, g in zip(eval_, g_eval):
                by_qtype[s.qtype].append(n_bars[alloc.get(g, default)])
            rows[name] = {
                "allocation": {g: round(float(n_bars[s]), 2) for g, s in sorted(alloc.items())},
                "eval_accuracy": acc,
                "eval_n_bar": nb,
                "uniform_at_same_n_bar": base,
                "headroom_points": 100 * (acc - base),
                "n_bar_by_qtype": {q: float(np.mean(v)) for q, v in sorted(by_qtype.items())},
            }
        out["targets"][str(target)] = {"uniform_eval_accuracy": uniform_at(uni_eval, n_bars, tokens), "oracles": rows}
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Adaptivity headroom: {res['meta']['checkpoint']}", ""]
    m = res["meta"]
    lines += [
        f"{m['train_samples']} training questions choose the allocation, {m['eval_samples']} eval questions "
        f"score it; {m['date']}, {m['device']}.",
        "",
        "| share grid N_bar | " + " | ".join(f"{x:.1f}" for x in res["shares_n_bar"]) + " |",
        "|---|" + "---|" * len(res["shares_n_bar"]),
        "| uniform eval accuracy | " + " | ".join(f"{x:.3f}" for x in res["uniform_eval_accuracy"]) + " |",
        "",
        "| target | oracle by | eval accuracy | eval N_bar | uniform at that N_bar | headroom (points) "
        "| N_bar per question type |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, row in res["targets"].items():
        for name, o in row["oracles"].items():
            per = ", ".join(f"{q} {v:.1f}" for q, v in o["n_bar_by_qtype"].items())
            lines.append(
                f"| {float(t):.0%} | {name} | {o['eval_accuracy']:.3f} | {o['eval_n_bar']:.1f} | "
                f"{o['uniform_at_same_n_bar']:.3f} | {o['headroom_points']:+.1f} | {per} |"
            )
    lines += ["", "Allocations (N_bar per group, chosen on the training questions):", ""]
    for t, row in res["targets"].items():
        alloc = row["oracles"]["qtype x shapes"]["allocation"]
        lines.append(f"- {float(t):.0%}: " + "; ".join(f"{g}: {v:.1f}" for g, v in alloc.items()))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline headroom", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a saved model, run with pruning=fixed: a run's projector (the base) or variants/fixed-PCT/export",
    )
    p.add_argument("--train-shards", required=True, help="questions that choose the allocation (train split)")
    p.add_argument("--eval-shards", required=True, help="questions that score it (eval split, untuned seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--targets", nargs="+", type=float, default=[0.25, 0.15, 0.11])
    p.add_argument("--shares", nargs="+", type=float, default=list(SHARES))
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-eval", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipeline.eval.evaluate import device_description, load_model
    from pipeline.eval.samples import load_samples

    model, proc = load_model(a.checkpoint, pruning="fixed")
    lv = model.config.num_visual_tokens
    train, eval_ = load_samples(a.train_shards, a.limit_train), load_samples(a.eval_shards, a.limit_eval)
    shares = sorted(set(a.shares))
    correct, n_bars = sweep(model, proc, train + eval_, shares, a.batch_size)
    res = analyse(train, eval_, correct[: len(train)], correct[len(train) :], n_bars, a.targets, lv)
    res["meta"] = {
        "checkpoint": a.checkpoint,
        "train_shards": a.train_shards,
        "eval_shards": a.eval_shards,
        "train_samples": len(train),
        "eval_samples": len(eval_),
        "shares": shares,
        "date": time.strftime("%Y-%m-%d"),
        "device": device_description(),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "correct.npy", correct)
    (out / "headroom.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "headroom.md")
    print((out / "headroom.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
