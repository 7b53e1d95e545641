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
            row = {}
            for signal in MARGINAL_SIGNALS:
                model.config.marginal_signal = signal
                row[signal] = model._marginal_values({**inputs, "position_ids": None})
            row.update(zip(("right_low", "right_high"), right_at_two_budgets(model, inputs)))
            n_bar = model(**inputs).visual_tokens.mean(1)
            for j, meta in enumerate(batch["meta"]):
                if batch["has_image"][j]:
                    values[meta["qtype"]].append([row[k][j].item() for k in row])
                    n_bars[meta["qtype"]].append(n_bar[j].item())
    names = list(MARGINAL_SIGNALS) + ["right_low", "right_high"]
    for q in sorted(values):
        v, n = torch.tensor(values[q]), torch.tensor(n_bars[q])
        print(f"{q:12s} n={len(v):4d}", end="")
        for k, name in enumerate(names):
            print(f"  {name} {v[:, k].mean():+.3f} (std {v[:, k].std():.3f})", end="")
        print(f"  soft N_bar {n.mean():.1f} (std {n.std():.1f})")


def right_at_two_budgets(model, inputs):
    """[B] per sample: every answer token the argmax, at (1 -/+ marginal_span) x the schedule."""
    from model.budget import module_counts
    from model.modeling_atp_llava import _config_set

    cfg, out = model.config, []
    for scale in (1 - cfg.marginal_span, 1 + cfg.marginal_span):
        fixed = [min(cfg.num_visual_tokens, max(1, round(c * scale))) for c in module_counts(cfg)]
        with _config_set(cfg, pruning="fixed", fixed_counts=fixed):
            logits = model(**inputs).logits
        target = inputs["labels"][:, 1:]
        wrong = (logits[:, :-1].argmax(-1) != target) & (target != -100)
        out.append((~wrong.any(1)).float())
    return out


if __name__ == "__main__":
    main()
