"""Where a method's kept tokens sit: per-record diagnostics of an eval run.

Every synthetic sample records its scene, so `shards.objects.object_map` says which visual tokens
cover a shape (`evaluate.Sample.object_map`). From the keep masks a model reports at prefill
(`atp_info["keep"]`: the cumulative keep after each pruning point, [K, Lv] per image) this
collects, over the image samples:

- `object_recall`: the share of object tokens (big or small shape) that reach the last layer, and
  `object_recall_per_point` after each pruning point; the same for small shapes alone;
- `background_share`: the share of the tokens kept after the last point that are plain background;
- for ATP (`atp_info["branch"]`, hard path): kept tokens per image after each module that only the
  redundancy branch, only the spatial branch, or both kept;
- `n_bar_by_qtype`: N_bar per question type (TokenStats per type);
- adaptivity: the spread of N_bar over images (`n_bar_spread`: std, 10th / 90th percentile) and
  the rank correlation between an image's N_bar and its number of small shapes
  (`rank_corr_n_bar_shapes`, Spearman; None when either does not vary).

Methods that prune nothing (the unpruned model) get recall 1 and their plain background share.
Samples without a scene (LLaVA-format shards) count in `n_bar_by_qtype` only.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.eval.answers import TokenStats
from shards.objects import BACKGROUND, SMALL

BRANCHES = {1: "redundancy_only", 2: "spatial_only", 3: "both"}


class Diagnostics:
    def __init__(self, grid: int, lv: int):
        self.offset = lv - grid * grid  # "full" strategy: a CLS token before the grid
        self.qtype_tokens: dict[str, TokenStats] = defaultdict(TokenStats)
        self.kept_obj = self.kept_small = None  # [K] sums over images
        self.n_obj = self.n_small = self.kept_last = self.kept_bg = 0
        self.branch = None  # [K, 3] kept tokens by branch, summed over images
        self.images = 0
        self.n_bars, self.shapes = [], []  # per image sample: N_bar, small shapes (None: no scene)

    def add(self, qtype: str, labels, visual_tokens, keep=None, branch=None, n_shapes=None) -> None:
        """One image sample's prefill: labels [grid * grid], its object map (None: no scene);
        visual_tokens [num_layers]; keep [K, Lv] (None: nothing pruned); branch [K, Lv] int (ATP's
        hard path) or None; n_shapes: its number of small shapes (None: unknown)."""
        self.qtype_tokens[qtype].add(visual_tokens[None], [True])
        self.n_bars.append(float(visual_tokens.float().mean()))
        self.shapes.append(n_shapes)
        if labels is None:
            return
        keep = np.ones((1, labels.size), bool) if keep is None else keep.bool().numpy()[:, self.offset :]
        obj, small = labels != BACKGROUND, labels == SMALL
        kept_obj, kept_small = (keep & obj).sum(1), (keep & small).sum(1)
        self.kept_obj = kept_obj if self.kept_obj is None else self.kept_obj + kept_obj
        self.kept_small = kept_small if self.kept_small is None else self.kept_small + kept_small
        self.n_obj, self.n_small = self.n_obj + obj.sum(), self.n_small + small.sum()
        self.kept_last += keep[-1].sum()
        self.kept_bg += (keep[-1] & ~obj).sum()
        self.images += 1
        if branch is not None:
            b = branch.numpy()
            counts = np.stack([(b == v).sum(1) for v in BRANCHES], 1)
            self.branch = counts if self.branch is None else self.branch + counts

    def summary(self) -> dict:
        """By `Record` field name (pipeline/eval/records.py); a field this cannot know is left out."""
        out = {"n_bar_by_qtype": {q: s.summary()["n_bar"] for q, s in sorted(self.qtype_tokens.items())}}
        if self.n_bars:
            nb = np.array(self.n_bars)
            out["n_bar_spread"] = {
                "std": float(nb.std()),
                "p10": float(np.percentile(nb, 10)),
                "p90": float(np.percentile(nb, 90)),
            }
            known = [(n, k) for n, k in zip(self.n_bars, self.shapes) if k is not None]
            out["rank_corr_n_bar_shapes"] = spearman(*zip(*known)) if known else None
        if not self.images:
            return out
        recall = (self.kept_obj / max(self.n_obj, 1)).tolist()
        small = (self.kept_small / max(self.n_small, 1)).tolist()
        out.update(
            object_recall=recall[-1],
            object_recall_per_point=recall,
            small_recall=small[-1],
            small_recall_per_point=small,
            background_share=float(self.kept_bg / max(self.kept_last, 1)),
            object_tokens_per_image=float(self.n_obj / self.images),
        )
        if self.branch is not None:
            per_image = self.branch / self.images
            out["kept_by_branch"] = {name: per_image[:, i].tolist() for i, name in enumerate(BRANCHES.values())}
        return out


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(a):
    order = a.argsort(kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    for v in np.unique(a):  # ties share their mean rank
        tie = a == v
        ranks[tie] = ranks[tie].mean()
    return ranks
