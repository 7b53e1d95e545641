"""Stage `shards`: the synthetic benchmark's train and eval shards (shards.synthetic) in
`run_dir/shards/{train,eval}`, for the embedded default. Rank 0 writes; the generator is
deterministic, so a rerun after a crash rewrites the same bytes."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier
from pipeline.stages import Context


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    if ctx.dist.rank == 0:
        from shards import synthetic

        s = run.synthetic
        for split, n in (("train", s.train_samples), ("eval", s.eval_samples)):
            synthetic.main(
                [
                    "--out",
                    str(out / split),
                    "--split",
                    split,
                    "--samples",
                    str(n),
                    "--seed",
                    str(s.seed),
                    "--image-size",
                    str(s.image_size),
                    "--maxcount",
                    str(s.maxcount),
                    *s.args,
                ]
            )
    barrier()
    return True
