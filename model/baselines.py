"""Training-free visual-token pruning baselines on ATP's hard path, at matched budgets (METHOD sec 9).

```python
from model.baselines import POLICIES, make_policy
model.eval()
model.pruning_policy = make_policy("fastv", model.config, share=0.11)   # None: back to ATP / none
out = model(input_ids=..., pixel_values=..., attention_mask=...)       # or model.generate(...)
out.visual_tokens                                                       # [B, N] per-layer counts (METHOD sec 7)
model.pruning_policy.describe()                                         # paper, layers, counts, deviations
```

A budget is a share of Lv: N_bar (METHOD sec 7: visual tokens per decoder layer, averaged over
all N layers, Lv for the layers before the first pruning point) = share * Lv, as close as integer
counts allow (`model/budget.py` `counts_for_budget`). Every policy keeps exactly its counts per image: the papers'
adaptive counts (PruMerge's IQR outliers, SparseVLM's rank-based deletion) are replaced by the
budget, which is what a matched comparison needs.

A policy tells the decoder loop (`modeling_atp_llava.py`) where it prunes (`layers`; 0 = before
the first decoder layer, i = before layer i) and, per pruning point, `select(ctx)` returns the kept
tokens over the original Lv positions plus, for merging policies, new features for them; the loop
gathers them exactly as ATP's hard path does (original positions, pruned KV cache, decoding).
Attention-based policies get layer i-1's attention from the same block-wise score call ATP uses
(`attention_compute`, inside that layer's attention; the main attention stays SDPA). Vision-tower
policies read the CLIP layer LLaVA takes its features from through hooks during the model's own
vision forward (`vision_tap`): q/k of that layer (CLS attention, keys) and its output.

Common deviations from the papers, for every policy: positions of kept tokens are their original
ones (METHOD sec 5 `preserve`; the papers re-number the shortened sequence), and tokens made by
merging sit at the position of one of their members. This file is not copied into exported
checkpoints (the model file does not import it), so an export runs a policy only with this repo
importable; it imports only torch and relative modules all the same.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .budget import counts_for_budget, n_bar
from .scores import visual_attention

POLICIES = ("fastv", "prumerge", "prumerge+", "sparsevlm", "visionzip", "uniform", "random")


def scale_layers(layers_of_32, num_layers: int) -> list[int]:
    """Pruning points given for a 32-layer LLM (LLaVA-1.5 7B) moved proportionally to num_layers,
    kept >= 1 (they read the attention of the layer before) and strictly increasing."""
    out = []
    for i in layers_of_32:
        j = max(int(math.floor(i * num_layers / 32 + 0.5)), 1, out[-1] + 1 if out else 1)
        if j >= num_layers:
            break
        out.append(j)
    return out


# -- shared helpers ---------------------------------------------------------------------------
def top_n(score, live, n):
    """[B, Lv] bool: the n highest-scoring live tokens per row (n an int or a [B] tensor; all live
    tokens if fewer); ties go to the lower index."""
    masked = torch.where(live, score.float(), torch.tensor(-math.inf, device=score.device))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    n = torch.as_tensor(n, device=score.device)
    n = n[:, None] if n.dim() == 1 else n
    return (rank < n) & live


def grid_indices(grid: int, n: int) -> list[int]:
    """n token indexes (row-major in a grid x grid map) spread evenly over the image: about sqrt(n)
    rows, evenly spaced and centred, each with an evenly spaced, centred set of columns (row counts
    differ by at most one). A perfect square n on a divisible grid is the centred stride grid, e.g.
    16 of 12 x 12 = rows and columns 1, 4, 7, 10 (METHOD sec 2's centred offset)."""
    n = max(0, min(int(n), grid * grid))
    if n == 0:
        return []
    rows = min(max(int(math.floor(math.sqrt(n) + 0.5)), math.ceil(n / grid), 1), grid)
    out = []
    for r in range(rows):
        m = n // rows + (1 if r < n % rows else 0)
        row = int((r + 0.5) * grid / rows)
        out.extend(row * grid + int((c + 0.5) * grid / m) for c in range(m))
    return sorted(out)


def _patch_offset(config) -> int:
    """Index of the first grid token among the Lv visual tokens (1 if CLS is kept, "full" strategy)."""
    return config.num_visual_tokens - config.grid_size**2


def _rows(values, has_img, fill=0.0):
    """Per-image tensors [n_img, ...] -> per-sample rows [B, ...] (text-only samples: fill)."""
    out = values.new_full((has_img.shape[0], *values.shape[1:]), fill)
    out[has_img] = values.to(out.dtype)
    return out


class VisionTap:
    """Hooks on the CLIP layer LLaVA takes its features from (`vision_feature_layer`), active only
    during the model's own vision forward: its q/k projections and its output. Afterwards:
    `cls_attention()` [n_img, Lv] (CLS row of that layer's softmax attention, head mean),
    `keys()` [n_img, Lv, H, hd], `features()` [n_img, Lv, Dv] (what the projector reads)."""

    def __init__(self, model):
        cfg = model.config
        tower = model.model.vision_tower
        encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
        f = cfg.vision_feature_layer
        if not isinstance(f, int):
            raise ValueError(f"vision_feature_layer={f}: the vision-tower baselines need a single layer")
        n = len(encoder.layers)
        self.index = (f if f >= 0 else n + 1 + f) - 1  # hidden_states[f] is the output of this layer
        if not 0 <= self.index < n:
            raise ValueError(f"vision_feature_layer={f}: no encoder layer produces it (the tower has {n})")
        self.layer = encoder.layers[self.index]
        self.drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
        self.heads = self.layer.self_attn.num_heads
        self.out = {}
        self._handles = []

    def __enter__(self):
        self.out.clear()

        def grab(name):
            def hook(module, args, output):
                self.out[name] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        attn = self.layer.self_attn
        self._handles = [
            attn.q_proj.register_forward_hook(grab("q")),
            attn.k_proj.register_forward_hook(grab("k")),
            self.layer.register_forward_hook(grab("h")),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    @property
    def captured(self) -> bool:
        return {"q", "k", "h"} <= set(self.out)

    def _heads(self, x):
        return x.float().view(*x.shape[:2], self.heads, -1)  # [n_img, T, H, hd]

    def cls_attention(self):
        q, k = self._heads(self.out["q"]), self._heads(self.out["k"])
        logits = torch.einsum("nhd,nthd->nht", q[:, 0], k) * q.shape[-1] ** -0.5
        return logits.softmax(-1).mean(1)[:, self.drop :]  # [n_img, Lv]

    def keys(self):
        return self._heads(self.out["k"])[:, self.drop :]

    def features(self):
        return self.out["h"][:, self.drop :]


# -- policies -----------------------------------------------------------------------------------
class Policy:
    """Base: one pruning point before the LLM (layer 0) unless a subclass says otherwise."""

    name = ""
    paper = ""
    differs: tuple = ()
    reads_vision = False  # True: reads the CLIP layer through `vision_tap` hooks

    def __init__(self, config, share: float):
        self.config = config
        self.share = float(share)
        self.lv = config.num_visual_tokens
        self.num_layers = config.text_config.num_hidden_layers
        self.layers = [0]
        self.counts = counts_for_budget(self.layers, self.num_layers, self.lv, self.share)
        self._tap = None

    # hooks the decoder loop calls
    def attention_compute(self, layer):
        """What to compute from the attention of layer `layer` - 1 (None: nothing)."""
        return None

    def vision_tap(self, model):
        """A context around the vision forward: hooks on the CLIP layer for `reads_vision` policies."""
        if not self.reads_vision:
            return contextlib.nullcontext()
        self._tap = VisionTap(model)
        return self._tap

    def captured_tap(self):
        """The VisionTap of this forward (`reads_vision` policies)."""
        if self._tap is None or not self._tap.captured:
            raise RuntimeError(
                f"{self.name}: the vision tower's layer was not captured (set the policy before the forward)"
            )
        return self._tap

    def select(self, ctx):
        """(keep [B, Lv] bool, features [B, Lv, D] for the kept tokens or None) at ctx.layer."""
        raise NotImplementedError

    def count(self, layer) -> int:
        return self.counts[self.layers.index(layer)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "paper": self.paper,
            "layers": list(self.layers),
            "counts": list(self.counts),
            "share": self.share,
            "lv": self.lv,
            "num_layers": self.num_layers,
            "n_bar": n_bar(self.layers, self.counts, self.num_layers, self.lv),
            "target_n_bar": self.share * self.lv,
            "differs": list(self.differs)
            + [
                "kept tokens keep their original positions (the paper re-numbers the shortened sequence)",
            ],
        }


class Uniform(Policy):
    name = "uniform"
    paper = "spatially uniform sampling (the spatial part of PruMerge+ / ATP's S_spatial, alone)"
    differs = ("before the LLM: an evenly spaced grid of n tokens (`grid_indices`), the same for every image",)

    def select(self, ctx):
        keep = torch.zeros_like(ctx.live)
        idx = torch.tensor(grid_indices(self.config.grid_size, self.counts[0]), dtype=torch.long) + _patch_offset(
            self.config
        )
        keep[:, idx.to(keep.device)] = True
        return keep & ctx.live, None


class Random(Policy):
    name = "random"
    paper = "random token dropping (sanity baseline)"
    differs = (
        "before the LLM: n tokens uniformly at random; every forward re-seeds a CPU generator with `seed`, "
        "rows drawn in batch order (reproducible for the same batch)",
    )

    def __init__(self, config, share, seed: int = 0):
        super().__init__(config, share)
        self.seed = int(seed)

    def select(self, ctx):
        g = torch.Generator().manual_seed(self.seed)
        score = torch.rand(ctx.live.shape, generator=g).to(ctx.live.device)
        return top_n(score, ctx.live, self.counts[0]), None

    def describe(self):
        return {**super().describe(), "seed": self.seed}


class FastV(Policy):
    name = "fastv"
    paper = "FastV: An Image is Worth 1/2 Tokens After Layer 2 (Chen et al., ECCV 2024, arXiv 2403.06764)"

    def __init__(self, config, share, k: int = 2):
        super().__init__(config, share)
        self.k_requested = int(k)
        lv, N = self.lv, self.num_layers
        target = self.share * lv * N
        feasible = [K for K in range(1, min(self.k_requested, N - 1) + 1) if K * lv + (N - K) <= target + 0.5 * (N - K)]
        if not feasible:
            raise ValueError(
                f"fastv: share={share} is out of reach even when pruning before layer 1 "
                f"(N_bar >= {(lv + N - 1) / N:.2f}, target {self.share * lv:.2f})"
            )
        self.K = max(feasible)
        self.layers = [self.K]
        self.counts = counts_for_budget(self.layers, N, lv, self.share)

    def attention_compute(self, layer):
        return visual_attention

    def select(self, ctx):
        att, valid = ctx.attention, ctx.q_valid.float()
        score = att.sum(1) / valid.sum(1, keepdim=True).clamp_min(1.0)  # mean over the text rows
        return top_n(score, ctx.live, self.counts[0]), None

    def describe(self):
        d = super().describe()
        d["differs"] = [
            f"K={self.K}: keep the top-R visual tokens by the attention they receive in layer K-1 "
            "(probability, mean over heads and over the text after the image: the query rows ATP's "
            "S_cross uses; FastV averages over all later tokens, its code reads the last token's row)",
            "R set by the budget (FastV: R = 50% / 75%)",
        ] + d["differs"]
        if self.K != self.k_requested:
            d["differs"].insert(
                0,
                f"K={self.k_requested} (FastV's default) cannot reach N_bar "
                f"{self.share * self.lv:.2f}: the {self.k_requested} full layers alone cost more; "
                f"K={self.K} is the largest that can",
            )
        d["k"] = self.K
        return d


class PruMerge(Policy):
    name = "prumerge"
    reads_vision = True
    paper = (
        "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models "
        "(Shang et al., 2024, arXiv 2403.15388)"
    )

    def __init__(self, config, share, k_neighbors: int | None = None):
        super().__init__(config, share)
        # PruMerge merges the 32 nearest of 575 other tokens; scaled to this Lv
        self.k_neighbors = int(k_neighbors) if k_neighbors else max(1, round(32 * self.lv / 576))
        self.k_neighbors = min(self.k_neighbors, self.lv - 1)
        self.iqr_seen = [0, 0]  # IQR outliers the paper would have kept: sum, images (for the report)

    def _chosen(self, attn, live):
        return top_n(attn, live, self.counts[0])

    def select(self, ctx):
        if not ctx.has_img.any():  # the vision tower did not run
            return torch.zeros_like(ctx.live), None
        tap = self.captured_tap()
        attn_img = tap.cls_attention()  # [n_img, Lv]
        q1, q3 = torch.quantile(attn_img, 0.25, dim=1), torch.quantile(attn_img, 0.75, dim=1)
        self.iqr_seen[0] += int((attn_img > (q3 + 1.5 * (q3 - q1))[:, None]).sum())
        self.iqr_seen[1] += attn_img.shape[0]
        attn = _rows(attn_img, ctx.has_img)
        keep = self._chosen(attn, ctx.live)
        # merge: each kept token adds the CLS-attention-weighted features of its k nearest other
        # tokens by key cosine similarity (PruMerge's code: all other tokens, kept or not)
        x = tap.features().float()  # [n_img, Lv, Dv]
        keys = F.normalize(tap.keys().flatten(2), dim=-1)  # all heads' keys, as PruMerge's code
        sim = keys @ keys.transpose(1, 2)
        sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        nn_idx = sim.topk(self.k_neighbors, dim=-1).indices  # [n_img, Lv, k]
        w = attn_img.gather(1, nn_idx.flatten(1)).view_as(nn_idx)
        neigh = x.gather(1, nn_idx.flatten(1)[..., None].expand(-1, -1, x.shape[-1])).view(*nn_idx.shape, -1)
        merged = x + (w[..., None] * neigh).sum(2)
        model = ctx.model
        proj = model.model.multi_modal_projector(merged.to(ctx.embeds.dtype))
        return keep, _rows(proj, ctx.has_img)

    def describe(self):
        d = super().describe()
        d["k_neighbors"] = self.k_neighbors
        if self.iqr_seen[1]:
            d["iqr_outliers_mean"] = self.iqr_seen[0] / self.iqr_seen[1]
        d["differs"] = [
            "n = budget tokens with the highest CLS attention instead of the IQR outliers (Q3 + 1.5 IQR; "
            "`iqr_outliers_mean` reports how many those would have been)",
            "CLS attention of the CLIP layer whose output LLaVA uses (vision_feature_layer; -2 = penultimate "
            "for LLaVA-1.5), softmax per head, head mean; PruMerge's code takes q/k of the last layer "
            "(layers[23]) as one 1024-d head",
            f"merge: kept token + sum over its k={self.k_neighbors} nearest other tokens (key cosine, all heads) "
            "of CLS attention x feature, before the projector (PruMerge: k=32 of 575; scaled by Lv/576)",
            "no extra token for the attention-weighted sum of the pruned tokens (PruMerge's code appends one)",
        ] + d["differs"]
        return d


class PruMergePlus(PruMerge):
    name = "prumerge+"
    paper = PruMerge.paper + " (PruMerge+)"

    def __init__(self, config, share, k_neighbors: int | None = None, uniform_share: float = 0.75):
        super().__init__(config, share, k_neighbors)
        n = self.counts[0]
        self.n_uniform = min(n, max(0, round(n * uniform_share)))
        self.uniform_share = uniform_share

    def _chosen(self, attn, live):
        grid = torch.zeros_like(live)
        idx = torch.tensor(grid_indices(self.config.grid_size, self.n_uniform), dtype=torch.long) + _patch_offset(
            self.config
        )
        grid[:, idx.to(grid.device)] = True
        grid &= live
        rest = top_n(attn, live & ~grid, self.counts[0] - grid.sum(1))
        return grid | rest

    def describe(self):
        d = super().describe()
        d["n_uniform"] = self.n_uniform
        d["differs"].insert(
            1,
            f"+: {self.n_uniform} of the n tokens form an evenly spaced grid (`grid_indices`), "
            "the rest are the top CLS-attention tokens outside it (PruMerge+'s code adds a 1-D "
            "arithmetic sequence of about 3x the outliers, so ~3/4 of the total)",
        )
        return d


class VisionZip(Policy):
    name = "visionzip"
    reads_vision = True
    paper = (
        "VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., 2024, arXiv 2412.04467)"
    )

    def __init__(self, config, share, contextual_share: float = 10 / 64):
        super().__init__(config, share)
        n = self.counts[0]
        # VisionZip on LLaVA-1.5: 54 + 10, 108 + 20, 162 + 30 (dominant + contextual)
        self.n_contextual = min(max(1, int(n * contextual_share + 0.5)), n - 1) if n > 1 else 0
        self.n_dominant = n - self.n_contextual

    def select(self, ctx):
        if not ctx.has_img.any():  # the vision tower did not run
            return torch.zeros_like(ctx.live), None
        tap = self.captured_tap()
        attn = _rows(tap.cls_attention(), ctx.has_img)
        dominant = top_n(attn, ctx.live, self.n_dominant)
        x = tap.features().float()
        metric = F.normalize(tap.keys().mean(2), dim=-1)  # head-mean keys, as VisionZip
        merged = x.clone()
        keep = dominant.clone()
        for i, b in enumerate(torch.nonzero(ctx.has_img).flatten().tolist()):
            rest = torch.nonzero(ctx.live[b] & ~dominant[b]).flatten()
            c = min(self.n_contextual, rest.numel())
            if c == 0:
                continue
            step = max(1, rest.numel() // c)
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
            is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:c]] = True
            targets, others = rest[is_target], rest[~is_target]
            sim = metric[i, others] @ metric[i, targets].T
            assign = F.one_hot(sim.argmax(-1), c).to(x.dtype) if others.numel() else x.new_zeros(0, c)
            merged[i, targets] = (x[i, targets] + assign.T @ x[i, others]) / (1 + assign.sum(0))[:, None]
            keep[b, targets] = True
        proj = ctx.model.model.multi_modal_projector(merged.to(ctx.embeds.dtype))
        return keep, _rows(proj, ctx.has_img)

    def describe(self):
        d = super().describe()
        d.update(n_dominant=self.n_dominant, n_contextual=self.n_contextual)
        d["differs"] = [
            f"dominant + contextual = budget: {self.n_dominant} + {self.n_contextual} "
            "(VisionZip's LLaVA-1.5 settings 54+10 / 108+20 / 162+30 keep this 10:54 proportion)",
            "dominant: top CLS attention (head mean of the softmax; VisionZip sums heads: same ranking) of "
            "the CLIP layer LLaVA reads; with the 'default' strategy CLS itself is no LLM token, so all "
            "dominant tokens are patches (VisionZip keeps CLS as one)",
            "contextual: the rest in index order, every step-th a target, the others averaged into their "
            "most similar target (head-mean key cosine), before the projector; each contextual token sits "
            "at its target's position",
        ] + d["differs"]
        return d


class SparseVLM(Policy):
    name = "sparsevlm"
    paper = (
        "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
        "(Zhang et al., 2024, arXiv 2410.04417)"
    )
    # SparseVLM's released schedules for LLaVA-1.5 (kept tokens at its 3 pruning layers) and the share they aim at
    SCHEDULES = {192 / 576: (300, 200, 110), 128 / 576: (303, 110, 36), 64 / 576: (66, 30, 17)}

    def __init__(self, config, share, layers=None, ratios=None, recycle_share: float = 0.3, cluster_per: int = 10):
        super().__init__(config, share)
        self.layers = list(layers) if layers is not None else scale_layers((2, 6, 15), self.num_layers)
        if ratios is None:
            ratios = self.SCHEDULES[min(self.SCHEDULES, key=lambda s: abs(s - self.share))]
            ratios = ratios[: len(self.layers)]
        self.ratios = list(ratios)
        self.counts = counts_for_budget(self.layers, self.num_layers, self.lv, self.share, self.ratios)
        self.recycle_share = recycle_share
        self.cluster_per = cluster_per
        if not self.layers or self.layers[0] < 1:
            raise ValueError(
                f"sparsevlm: layers={self.layers}: each pruning point reads the attention of the layer before (>= 1)"
            )
        self.recycled_seen = [0, 0]  # recycled tokens: sum, pruning steps (for the report)

    def attention_compute(self, layer):
        return visual_attention

    def _raters(self, ctx):
        """SparseVLM's text raters: softmax over the text tokens of visual x text embedding products,
        mean over the visual tokens; raters are the text tokens above the mean. [B, Q] bool."""
        e = ctx.embeds.float()
        ev = e.gather(1, ctx.vis_orig[..., None].expand(-1, -1, e.shape[-1]))  # [B, Lv, D]
        et = e.gather(1, ctx.q_orig[..., None].expand(-1, -1, e.shape[-1]))  # [B, Q, D]
        logits = (ev @ et.transpose(1, 2)).masked_fill(~ctx.q_valid[:, None, :], -math.inf)
        rel = torch.nan_to_num(logits.softmax(-1)).mean(1)  # [B, Q]
        valid = ctx.q_valid
        mean = (rel * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
        raters = valid & (rel > mean)
        return torch.where(raters.any(1, keepdim=True), raters, valid)

    def select(self, ctx):
        raters = self._raters(ctx).float()
        score = (ctx.attention * raters[:, :, None]).sum(1) / raters.sum(1, keepdim=True).clamp_min(1.0)
        n = self.count(ctx.layer)
        keep = torch.zeros_like(ctx.live)
        features = ctx.hidden.clone()
        for b in torch.nonzero(ctx.has_img).flatten().tolist():
            live = ctx.live[b]
            m = int(live.sum())
            if m <= n:
                keep[b] = live
                continue
            # SparseVLM: of the deleted tokens, the top 30% (+1) by score are clustered into
            # (that / 10) + 1 recycled tokens; here those come out of the same budget n
            cand = int((m - n) * self.recycle_share) + 1
            c = min(cand // self.cluster_per + 1, n - 1)
            kept = top_n(score[b : b + 1], live[None], n - c)[0]
            deleted = live & ~kept
            n_del = int(deleted.sum())
            pool = top_n(score[b : b + 1], deleted[None], min(int(n_del * self.recycle_share) + 1, n_del))[0]
            pool_idx = torch.nonzero(pool).flatten()
            c = min(c, pool_idx.numel())
            keep[b] = kept
            if c == 0:
                continue
            centers, groups = _dpc_knn(ctx.hidden[b, pool_idx].float(), c)
            for g in range(c):
                members = pool_idx[groups == g]
                pos = pool_idx[centers[g]]
                features[b, pos] = ctx.hidden[b, members].float().mean(0).to(features.dtype)
                keep[b, pos] = True
            self.recycled_seen[0] += c
            self.recycled_seen[1] += 1
        return keep, features

    def describe(self):
        d = super().describe()
        d["ratios"] = self.ratios
        if self.recycled_seen[1]:
            d["recycled_mean"] = self.recycled_seen[0] / self.recycled_seen[1]
        d["differs"] = [
            f"pruning before layers {self.layers} (SparseVLM's [2, 6, 15] of 32, scaled to {self.num_layers} layers, "
            "as in SparseVLM's own token accounting; its code ranks with a layer's own attention and prunes that "
            "layer's output, one layer later in this convention)",
            f"kept counts from the budget with SparseVLM's released schedule shape {self.ratios} "
            "(instead of its rank-based adaptive deletion count)",
            "raters: text after the image (the model's query rows) whose embedding relevance to the visual "
            "tokens is above the mean; score = mean rater attention probability (head mean) in the layer before",
            "recycling: top 30% (+1) of the deleted tokens by score, DPC-kNN clustered into (that / 10) + 1 "
            "tokens (feature mean, placed at the cluster centre's position), counted inside the budget",
        ] + d["differs"]
        return d


def _dpc_knn(x, c):
    """Density-peak clustering with k = c nearest neighbours (SparseVLM's recycling): returns the c
    centre indexes and each point's group [m] (centres in their own group). Deterministic: density
    ties go to the lower index."""
    m, d = x.shape
    dist = torch.cdist(x, x) / d**0.5
    k = min(c, m)
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    density = density - torch.arange(m, device=x.device, dtype=density.dtype) * 1e-9 * density.abs().clamp_min(1e-12)
    higher = density[None, :] > density[:, None]  # [i, j]: j denser than i
    far = dist.max()
    delta = torch.where(higher, dist, far).amin(-1)
    centers = (delta * density).topk(c).indices
    groups = dist[:, centers].argmin(-1)
    groups[centers] = torch.arange(c, device=x.device)
    return centers, groups


_CLASSES = {
    "fastv": FastV,
    "prumerge": PruMerge,
    "prumerge+": PruMergePlus,
    "sparsevlm": SparseVLM,
    "visionzip": VisionZip,
    "uniform": Uniform,
    "random": Random,
}

POLICIES = tuple(_CLASSES)  # the policy names; everything else reads them from here


def make_policy(name: str, config, share: float, **options):
    """A policy for `model.pruning_policy` at budget N_bar = share * Lv. options go to the class
    (fastv: k; prumerge/+: k_neighbors, uniform_share; visionzip: contextual_share; sparsevlm:
    layers, ratios; random: seed)."""
    if name not in _CLASSES:
        raise ValueError(f"policy {name!r}: expected one of {POLICIES}")
    return _CLASSES[name](config, share, **options)
