"""Does a sample's marginal value of tokens depend on its question? (METHOD sec 16, docs/RESULTS.md)

For a saved AtpLlava (an export, or the projector stage's model), on training batches: each image
sample's marginal value v under each `atp.marginal_signal` (its answer score at 1.5x minus at 0.5x the
per-module schedule, fixed ranking: what `atp.marginal_weight` trains on), the share of samples
answered right (teacher-forced argmax) at each budget, and its soft N_bar under its own thresholds, both
grouped by question type. Usage:

    python scripts/marginal_values.py CHECKPOINT SHARDS [--batches 12] [--batch-size 16]
"""

import argparse
import collections

import torch

from model.configuration_atp_llava import MARGINAL_SIGNALS
from model.modeling_atp_llava import answer_score
from pipeline.core.config import DataConfig
from pipeline.data.loader import build_loader
from pipeline.eval.evaluate import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("shards", help="a shard folder or brace pattern (the run's shards/train)")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)

    model, (tok, proc) = load_model(a.checkpoint)
    model.train()  # the soft path: the masks training sees
    cfg = model.config
    data = DataConfig(shards=a.shards, batch_size=a.batch_size, num_workers=0, shuffle_buffer=0, resampled=False)
    loader = build_loader(data, tok, proc, image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_visual_tokens)
    values, n_bars = collections.defaultdict(list), collections.defaultdict(list)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= a.batches:
                break
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "query_mask", "pixel_values")}
            (low, _), (high, _) = model._marginal_budget_logits({**inputs, "position_ids": None})
            labels = inputs["labels"]
            row = {s: answer_score(high, labels, s) - answer_score(low, labels, s) for s in MARGINAL_SIGNALS}
            row.update(right_low=answered_right(low, labels), right_high=answered_right(high, labels))
            n_bar = model(**inputs).visual_tokens.mean(1)
            for j, meta in enumerate(batch["meta"]):
                if batch["has_image"][j]:
                    values[meta["qtype"]].append([row[k][j].item() for k in row])
                    n_bars[meta["qtype"]].append(n_bar[j].item())
    names = list(row)
    for q in sorted(values):
        v, n = torch.tensor(values[q]), torch.tensor(n_bars[q])
        print(f"{q:12s} n={len(v):4d}", end="")
        for k, name in enumerate(names):
            print(f"  {name} {v[:, k].mean():+.3f} (std {v[:, k].std():.3f})", end="")
        print(f"  soft N_bar {n.mean():.1f} (std {n.std():.1f})")


def answered_right(logits, labels):
    """[B] per sample: every answer token the argmax (teacher-forced)."""
    target = labels[:, 1:]
    wrong = (logits[:, :-1].argmax(-1) != target) & (target != -100)
    return (~wrong.any(1)).float()


if __name__ == "__main__":
    main()
