"""Stage `sft`: the trainer (pipeline/trainer.py) from the projector stage's model into run_dir/sft."""

from __future__ import annotations

from pathlib import Path

from pipeline import trainer
from pipeline.config import RunConfig
from pipeline.stages import Context, require_done


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    start = require_done(Path(run.run_dir) / "projector", "sft")
    return trainer.train(run, ctx, out, start)
