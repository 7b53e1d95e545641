"""Stage `eval`: the run's models and the training-free baselines on the eval shards,
at every budget of `eval.budgets`, into `run_dir/eval/report.{json,md}` and PNG plots
(pipeline/eval/evaluate.py). Rank 0 evaluates; the other ranks wait."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier
from pipeline.stages import Context


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    if ctx.dist.rank == 0:
        from model import AtpLlavaConfig
        from pipeline.eval import evaluate
        from pipeline.eval.methods import SFT_REFERENCE, UNPRUNED, variant_name
        from pipeline.stages.variants import main_budget

        run_dir = Path(run.run_dir)
        lv = AtpLlavaConfig.from_pretrained(run_dir / "projector").num_visual_tokens
        models = {UNPRUNED: run_dir / "projector"}
        if run.eval.sft_reference:
            models[SFT_REFERENCE] = run_dir / "variants" / SFT_REFERENCE / "export"
        for method in run.eval.trained:
            for b in run.eval.budgets:
                models[(method, b)] = run_dir / "variants" / variant_name(method, b) / "export"
        b = main_budget(run, lv)
        if b is not None and run.export.pruning == "atp":
            models[("atp", b)] = run_dir / "export"
        evaluate.evaluate_checkpoints(models, out, run.eval, title=str(run_dir))
    barrier()
    return True
