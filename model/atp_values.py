"""The value rules of the ATP settings, in one place: `AtpLlavaConfig.validate_atp` (the model)
and the pipeline's config check (`pipeline/core/config.py`, which runs before torch is
imported) both call `check`. The field choices (pruning modes, kernels, ...) are
configuration_atp_llava.py's tuples.

This file is copied into exported checkpoints (trust_remote_code): stdlib only, so that the
config check can import it without torch (model/__init__.py loads its other modules lazily).
"""

from __future__ import annotations


class AtpValueError(ValueError):
    """A bad ATP setting; `field` names it (the config check reports it as `atp.FIELD`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check(
    atp_layers,
    num_layers: int | None = None,
    pruning: str = "atp",
    fixed_counts=None,
    target_tokens: float | None = None,
    num_visual_tokens: int | None = None,
    budget_loss: str = "n_bar",
    marginal_weight: float = 0.0,
    marginal_span: float = 0.5,
    branch_weight: float = 0.0,
    spatial_strides=None,
    spatial_modules=None,
) -> None:
    """Raise AtpValueError on the first bad value. A size that is None (not known yet: the
    config check before the model's files exist) is not checked against; `target_tokens`
    None is not checked (the model does not need a budget in reach: only training does)."""
    layers = list(atp_layers)
    if layers != sorted(set(layers)):
        raise AtpValueError("atp_layers", f"atp_layers={layers}: must be strictly increasing")
    # 0 is legal: a point before layer 0 scores with layer 0's own q/k (docs/METHOD.md sec 10)
    if layers and (layers[0] < 0 or (num_layers is not None and layers[-1] >= num_layers)):
        top = "N-1" if num_layers is None else num_layers - 1
        raise AtpValueError(
            "atp_layers",
            f"atp_layers={layers}: each index must be in [0, {top}] (a module before layer i uses the "
            "attention of layer i-1, before layer 0 layer 0's own q/k on the input embeddings"
            + ("" if num_layers is None else f"; the LM has {num_layers} layers")
            + ")",
        )
    if pruning == "fixed" and (fixed_counts is None or len(fixed_counts) != len(layers)):
        raise AtpValueError(
            "fixed_counts", f"fixed_counts={fixed_counts}: pruning='fixed' needs one count per ATP layer {layers}"
        )
    if target_tokens is not None:
        lv = num_visual_tokens
        if not target_tokens > 0 or (lv is not None and target_tokens > lv):
            raise AtpValueError(
                "target_tokens",
                f"target_tokens={target_tokens}: must be in (0, Lv]"
                + ("" if lv is None else f" (Lv = {lv} visual tokens)"),
            )
    if marginal_weight < 0 or not 0 < marginal_span < 1:
        raise AtpValueError(
            "marginal_weight" if marginal_weight < 0 else "marginal_span",
            f"marginal_weight={marginal_weight}, marginal_span={marginal_span}: "
            "expected a weight >= 0 and a span in (0, 1)",
        )
    if spatial_modules is not None:
        mods = list(spatial_modules)
        if mods != sorted(set(mods)) or any(not 0 <= k < len(layers) for k in mods):
            raise AtpValueError(
                "spatial_modules",
                f"spatial_modules={mods}: expected distinct, increasing module indexes in [0, {len(layers) - 1}] "
                f"(one module per entry of atp_layers {layers}), or null for every module",
            )
    if branch_weight < 0:
        raise AtpValueError("branch_weight", f"branch_weight={branch_weight}: expected a weight >= 0")
    no_grids = (spatial_strides is not None and not list(spatial_strides)) or spatial_modules == []
    if branch_weight > 0 and pruning == "atp" and no_grids:
        raise AtpValueError(
            "branch_weight",
            "branch_weight > 0 weighs the spatial branch against the redundancy one: it needs spatial_strides",
        )
    # pruning 'fixed' / 'none' ignore it (a run's fixed variants inherit the run's atp settings)
    if marginal_weight > 0 and pruning == "atp" and budget_loss == "n_bar":
        raise AtpValueError(
            "marginal_weight",
            "marginal_weight > 0 needs a per-module schedule (budget_loss per_module or dual): the two "
            "budgets are that schedule's counts scaled by 1 -/+ marginal_span",
        )
