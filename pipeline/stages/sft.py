"""Stage `sft`: the trainer (pipeline/train/trainer.py) from the projector stage's model into run_dir/sft."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import RunConfig
from pipeline.stages import Context, require_done
from pipeline.train import trainer


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    start = require_done(Path(run.run_dir) / "projector", "sft")
    return trainer.train(run, ctx, out, start)
