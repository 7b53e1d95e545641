"""Stage `export`: the trained weights as a Hugging Face hard-pruning checkpoint.

Reads sft's newest complete DeepSpeed checkpoint and consolidates it with DeepSpeed's own
`zero_to_fp32` reader (fp32 master weights, any ZeRO stage, any world size; no engine
and no process group needed), loads it into a plain CPU model and writes `run_dir/export`:
config.json with the ATP fields and `auto_map`, model.safetensors, the modeling code
(`model/*.py` that the model imports, copied by transformers' `custom_object_save`),
tokenizer, image processor and a LlavaProcessor. So

    AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)
    AutoProcessor.from_pretrained(dir)

work in a process that cannot import this repo, and `generate()` in eval mode prunes
for real (METHOD sec 5). Rank 0 works; the other ranks wait. Weights holding NaN or inf
are refused (checkpoint.NonFiniteWeights) before anything is written: no export, no DONE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration
from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier
from pipeline.stages import Context
from pipeline.train import checkpoint
from pipeline.train.build import apply_atp_fields, make_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    dist = ctx.dist
    if dist.rank == 0:
        export(run, out)
    barrier()
    return True


def export(run: RunConfig, out: Path, start: Path | None = None, ckpt_dir: Path | None = None) -> None:
    """sft's newest complete checkpoint (or `ckpt_dir`'s) on the model dir it started from (`start`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    run_dir = Path(run.run_dir)
    start = start or run_dir / "projector"
    ckpt_dir = ckpt_dir or run_dir / "sft" / checkpoint.DIRNAME
    state = checkpoint.consolidated_state_dict(ckpt_dir)
    checkpoint.require_finite(state, str(ckpt_dir))  # NonFiniteWeights: no export, no DONE

    config = apply_atp_fields(AtpLlavaConfig.from_pretrained(start), run)
    config.pruning = run.export.pruning
    config.validate_atp()
    model = AtpLlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # non-persistent buffers (spatial score, rotary frequencies) are rebuilt by __init__
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    if run.export.calibrate_budget and config.pruning == "atp":
        _calibrate_budget(model, run, start)
    model = model.to(DTYPES[run.export.dtype]).eval()
    model.config.dtype = DTYPES[run.export.dtype]

    # auto_map + copying modeling_atp_llava.py and the files it imports relatively
    AtpLlavaConfig.register_for_auto_class()
    AtpLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(start)
    image_processor = AutoImageProcessor.from_pretrained(start)
    make_processor(tokenizer, image_processor, config).save_pretrained(tmp)
    # the dir appears complete or not at all
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _calibrate_budget(model, run: RunConfig, start: Path) -> None:
    """Meet the budget at inference: the first question of `export.calibrate_budget` training
    samples, prompted as at evaluation (pipeline/eval/answers.py), and one offset to every threshold
    bias (model/calibration.py), in fp32 before the cast to the export dtype."""
    import logging

    from transformers import AutoImageProcessor, AutoTokenizer

    from model.calibration import calibrate_budget
    from pipeline.eval.samples import load_samples, prompt_inputs

    processor = (AutoTokenizer.from_pretrained(start), AutoImageProcessor.from_pretrained(start))
    samples = load_samples(run.data.shards, limit=run.export.calibrate_budget)
    batches = [prompt_inputs(model, processor, samples[i : i + 16]) for i in range(0, len(samples), 16)]
    cfg = model.config
    schedule = None
    if run.export.calibrate_schedule:
        from model.budget import module_counts

        schedule = list(module_counts(cfg))
    offsets, n_bar = calibrate_budget(model, batches, schedule=schedule)
    logging.getLogger(__name__).info(
        "budget calibrated on %d prompts: threshold bias offsets %s%s, N_bar %.2f (target %.2f)",
        len(samples),
        ", ".join(f"{o:+.3f}" for o in offsets),
        "" if schedule is None else f" (kept per module {schedule})",
        n_bar,
        cfg.target_tokens,
    )
