"""Which tokens does each redundancy score rank first? (docs/RESULTS.md, adaptivity)

For an exported checkpoint on synthetic eval shards: per question type and ATP module, the share of
plain-background tokens among the top-k live visual tokens by S_self, by S_cross and by their even
mix (min-max normalised as the model uses them, METHOD sec 1), beside the background's share of all
live tokens. A background question needs a background token; a ranking that never puts one near
the top cannot serve it at any count.

    python scripts/score_background.py CHECKPOINT SHARDS [--limit 160] [--top 8]
"""

import argparse
import collections

import numpy as np
import torch

from model.scores import minmax
from pipeline.eval.evaluate import load_model
from pipeline.eval.samples import load_samples, prompt_inputs
from shards.objects import BACKGROUND


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("shards")
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args(argv)
    model, proc = load_model(a.checkpoint)
    seen = []
    step = model._atp_step  # wrapped to read the two scores each module ranks by (they are not outputs)

    def recording_step(k, scores, C, *args, **kw):
        live = C > 0.5
        s = minmax(torch.stack(list(scores)).float(), live)
        seen.append((k, s[0], s[1], live))
        return step(k, scores, C, *args, **kw)

    model._atp_step = recording_step
    cfg = model.config
    g = cfg.grid_size
    off = cfg.num_visual_tokens - g * g
    stats = collections.defaultdict(lambda: collections.defaultdict(list))
    samples = load_samples(a.shards, a.limit)
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            batch = samples[i : i + 16]
            seen.clear()
            model(**prompt_inputs(model, proc, batch))
            for k, s_self, s_cross, live in seen:
                for j, sample in enumerate(batch):
                    bg = torch.from_numpy(sample.object_map(g).reshape(-1) == BACKGROUND)
                    on = live[j, off:]
                    if on.sum() < a.top:
                        continue
                    row = stats[(sample.qtype, k)]
                    for name, score in (("self", s_self), ("cross", s_cross), ("even", (s_self + s_cross) / 2)):
                        top = torch.where(on, score[j, off:], -1.0).topk(a.top).indices
                        row[name].append(bg[top].float().mean().item())
                    row["all live"].append(bg[on].float().mean().item())
    print(f"background share among the top {a.top} live tokens, per question type and module")
    for (qtype, k), row in sorted(stats.items()):
        cells = "  ".join(f"{name} {np.mean(v):.2f}" for name, v in row.items())
        print(f"{qtype:12s} module {k}  {cells}  (n {len(row['all live'])})")


if __name__ == "__main__":
    main()
