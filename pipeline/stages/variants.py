"""Stage `variants`: the trained comparison models of the evaluation, one per method x budget.

For each method in `eval.trained` (atp, fixed) and each budget in `eval.budgets` (N_bar / Lv),
except `atp` at the main run's own budget (that model is `sft` + `export`), this trains the
same SFT recipe from `run_dir/projector` and exports it, into `run_dir/variants/NAME/{sft,export}`
(NAME = METHOD-PCT, e.g. atp-11, fixed-15):
- atp: `atp.target_tokens` = budget x Lv;
- fixed (paper Table 2): `atp.pruning=fixed` with per-layer counts from
  model.budget.counts_for_budget, whose N_bar (METHOD sec 7) matches the budget;
- with `eval.sft_reference`, also `unpruned-sft`: `atp.pruning=none`, the fair reference (what the
  sft recipe alone does to the model, without pruning).
`eval.variant_overrides` applies to every variant (e.g. fewer steps). Each finished piece
leaves a DONE marker, so a rerun after a crash or a signal continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier
from pipeline.eval.methods import SFT_REFERENCE, TRAINED, match_budget, variant_name
from pipeline.stages import Context, is_done, mark_done, require_done

log = logging.getLogger(__name__)


def main_budget(run: RunConfig, lv: int) -> float | None:
    """The eval budget the main sft's ATP model was trained for (None if none matches)."""
    return match_budget(run.atp.target_tokens / lv, run.eval.budgets)


def planned(run: RunConfig, config) -> dict[str, dict]:
    """NAME -> run-config overrides of each variant."""
    from model.budget import counts_for_budget

    lv, n_layers = config.num_visual_tokens, config.text_config.num_hidden_layers
    skip = main_budget(run, lv) if run.atp.pruning == "atp" else None
    out = {}
    for method in run.eval.trained:
        for b in run.eval.budgets:
            if method == "atp" and b == skip:
                continue
            if method == "atp":
                atp = {"pruning": "atp", "target_tokens": b * lv}
            elif method == "fixed":
                atp = {"pruning": "fixed", "fixed_counts": counts_for_budget(list(run.atp.atp_layers), n_layers, lv, b)}
            else:
                raise ValueError(f"config error at 'eval.trained': {method!r} is not a trained method {TRAINED}")
            out[variant_name(method, b)] = {"atp": atp, "export": {"pruning": atp["pruning"]}}
    if run.eval.sft_reference:
        out[SFT_REFERENCE] = {"atp": {"pruning": "none"}, "export": {"pruning": "none", "calibrate_budget": 0}}
    return out


def variant_run(run: RunConfig, name: str, overrides: dict) -> RunConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(run),
        {"run_dir": str(Path(run.run_dir) / "variants" / name)},
        overrides,
        run.eval.variant_overrides,
    )
    return OmegaConf.to_object(cfg)


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    from model import AtpLlavaConfig
    from pipeline.stages import export
    from pipeline.train import trainer

    start = require_done(Path(run.run_dir) / "projector", "variants")
    plan = planned(run, AtpLlavaConfig.from_pretrained(start))
    for i, (name, overrides) in enumerate(plan.items()):
        vrun = variant_run(run, name, overrides)
        vdir = Path(vrun.run_dir)
        log.info("variant %d/%d %s: %s", i + 1, len(plan), name, overrides["atp"])
        if not is_done(vdir / "sft"):
            if not trainer.train(vrun, ctx, vdir / "sft", start):
                return False  # stopped on a signal after saving; a rerun resumes this variant
            _mark(ctx, vdir / "sft")
        if not is_done(vdir / "export"):
            if ctx.dist.rank == 0:
                export.export(vrun, vdir / "export", start=start)
            _mark(ctx, vdir / "export")
    return True


def _mark(ctx: Context, d: Path) -> None:
    barrier()
    mark_done(d)
