"""Stage `projector`: assemble vision tower + projector + Llama + ATP modules from the
configured source and write it as an HF dir (`run_dir/projector`), the starting point
of `sft`.

All ranks take part: under ZeRO-3 the model is built partitioned and each module's
weights are loaded gathered (pipeline.train.build); rank 0 writes the consolidated dir.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier, use_cuda
from pipeline.stages import Context
from pipeline.train import build
from pipeline.train.ds import build_ds_config, use_bf16


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    dist = ctx.dist
    from transformers import set_seed

    set_seed(run.seed)  # the ATP heads' random weights and a scratch model's
    config, tokenizer, image_processor, tensors = build.source_parts(run)
    cuda = use_cuda()
    ds = build_ds_config(
        run, world_size=dist.world_size, total_steps=1, hidden_size=config.text_config.hidden_size, cuda=cuda
    )
    dtype = torch.bfloat16 if use_bf16(run, cuda) else torch.float32
    model = build.instantiate(config, tensors, ds, dtype)
    build.save_pretrained_dir(model, tokenizer, image_processor, out)
    barrier()
    return True
