"""Data-calibrated threshold start (METHOD sec 3: "the first step keeps about the target share").

The analytic start (theta_r = 1 - q, `AtpLlavaForConditionalGeneration._init_weights`)
assumes min-max normalised redundancy scores spread evenly over [0, 1]; real ones are
skewed towards 0 (a few tokens draw most attention), so a module keeps far fewer than q of
its tokens and N_bar starts well under the target (measured on the embedded default: 17 of
144 tokens kept at the first module where q = 37% asks for 53, N_bar 21 for a target of 36).
With Adam moving a head's bias by about lr per step, a short SFT never recovers from that.

`calibrate_thresholds(model, batch)` runs the hard (inference) path on one batch and, module
by module, sets theta_r's bias to the score at which the module keeps a share q of its live
tokens (q from `keep_share_per_module`, so N_bar ~ target), given theta_s and the tokens
earlier modules kept. Forward hooks replace each module's thresholds during that pass, so
later modules see exactly the tokens the calibrated earlier ones keep. Nothing else changes.
"""

from __future__ import annotations

import math

import torch

from .atp_module import hard_keep
from .budget import keep_share_per_module, module_counts


@torch.no_grad()
def calibrate_thresholds(model, **inputs) -> list[float]:
    """Set each ATP module's theta_r bias from `inputs` (a batch with images); returns the
    calibrated theta_r per module. A no-op (empty list) when pruning is not `atp` or the
    batch holds no image."""
    cfg = model.config
    if cfg.pruning != "atp" or not cfg.atp_layers or getattr(model, "pruning_policy", None) is not None:
        return []
    n, lv = cfg.text_config.num_hidden_layers, cfg.num_visual_tokens
    q = keep_share_per_module(cfg.atp_layers, n, lv, cfg.target_tokens)
    # budget_loss=per_module: start each module at the count that loss pulls it to, not at a share
    counts = module_counts(cfg) if cfg.budget_loss in ("per_module", "dual") else None
    state = {"live": None, "theta": []}

    def hook(module, args, output):
        s_red, s_spa = args
        theta_r, theta_s = output
        live = state["live"]
        if live is None:  # first module: every token of an image sample (text-only rows are all 0)
            live = ((s_red != 0) | (s_spa != 0)).any(-1, keepdim=True).expand_as(s_red)
        rows = live.any(-1)
        if not rows.any():
            state["theta"].append(None)
            return output
        spatial = hard_keep(s_red, s_spa, theta_r[:, None], theta_s[:, None], live)[1]  # theta_s's branch: fixed here
        live_n = live.sum(-1).float()
        want = (q * live_n).round() if counts is None else live_n.clamp_max(counts[len(state["theta"])])
        need = (want - spatial.sum(-1)).clamp_min(0).long()
        cand = torch.where(live & ~spatial, s_red.float(), float("-inf")).sort(-1, descending=True).values
        n = cand.shape[-1]
        upper = cand.gather(-1, (need - 1).clamp(0, n - 1)[:, None]).squeeze(-1)  # the last kept
        lower = cand.gather(-1, need.clamp(0, n - 1)[:, None]).squeeze(-1)  # the first dropped
        per_row = torch.where(need > 0, (upper + lower.clamp_min(0)) / 2, upper + 1e-3)
        per_row = torch.where(torch.isfinite(per_row), per_row, torch.ones_like(per_row))
        theta = float(per_row[rows].median().clamp(1e-3, 1 - 1e-3))
        state["theta"].append(theta)
        new_r = torch.full_like(theta_r, theta)
        red, spatial = hard_keep(s_red, s_spa, theta, theta_s[:, None], live)  # what the model will keep
        state["live"] = red | spatial
        return new_r, theta_s

    was_training = model.training
    handles = [m.register_forward_hook(hook) for m in model.atp_modules]
    model.eval()
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for module, theta in zip(model.atp_modules, state["theta"]):
        if theta is not None:
            module.head_r.bias.fill_(math.log(theta / (1 - theta)))
    return [t for t in state["theta"] if t is not None]


@torch.no_grad()
def calibrate_budget(
    model, batches, target_tokens: float | None = None, iters: int = 24, schedule: list[float] | None = None
) -> tuple[list[float], float]:
    """After training: an offset, in logit space, added to threshold biases so that the hard path
    over `batches` (dicts of model inputs, prompts as at inference) meets the budget. Training
    leaves N_bar wherever L_target and L_ntp balance; the heads' weights, which make the
    thresholds differ per image, are kept.

    schedule None: one offset to every module's theta_r and theta_s biases, so that N_bar meets
    the target. schedule [c_0, c_1, ...]: one offset per module, set in order (a module sees the
    tokens the calibrated earlier ones keep), so that module k keeps c_k tokens per image on
    average (e.g. `budget.counts_for_budget`'s, whose N_bar is the target). Bisection (counts fall
    as thresholds rise); returns (offsets, N_bar reached)."""
    cfg = model.config
    was_training = model.training
    model.eval()

    def measure():
        """Mean visual tokens per image in each decoder layer, over `batches`."""
        total, images = 0.0, 0
        for inputs in batches:
            has_img = (inputs["input_ids"] == cfg.image_token_id).any(1)
            total = total + model(**inputs).visual_tokens[has_img].sum(0)
            images += int(has_img.sum())
        return total / max(images, 1)

    if schedule is None:
        groups = [([b for m in model.atp_modules for b in (m.head_r.bias, m.head_s.bias)], None)]
        targets = [cfg.target_tokens if target_tokens is None else target_tokens]
    else:
        groups = [([m.head_r.bias, m.head_s.bias], layer) for m, layer in zip(model.atp_modules, cfg.atp_layers)]
        targets = list(schedule)
    offsets = []
    try:
        for (biases, layer), target in zip(groups, targets):
            start = [b.clone() for b in biases]

            def at(offset):
                for b, b0 in zip(biases, start):
                    b.copy_(b0 + offset)
                tokens = measure()
                return float(tokens.mean() if layer is None else tokens[layer])

            lo, hi = -20.0, 20.0  # thresholds near 0 (keep all) and near 1 (keep the fewest)
            for _ in range(iters):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
            reached = {off: at(off) for off in (lo, hi)}
            best = min(reached, key=lambda off: abs(reached[off] - target))
            at(best)  # the biases end at the offset kept
            offsets.append(best)
        n_bar = float(measure().mean())
    finally:
        model.train(was_training)
    return offsets, n_bar
