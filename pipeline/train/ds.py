"""The DeepSpeed config: `ds_config.json` holds what is DeepSpeed's own business (overlap_comm,
bucket sizes, gathering 16-bit weights on save); everything the run YAML also describes (batch
sizes, optimizer, scheduler, precision, clipping, the ZeRO stage: `train.zero_stage`) is "auto"
there and filled here (the scheduler as a client LambdaLR), so the YAML stays the one source of truth.

Also the switch that tells transformers a ZeRO-3 run is on (`zero3_enabled`): while it is
held, `from_pretrained` / `_from_config` build under `deepspeed.zero.Init` and load weights
rank 0 -> partitions, which is what LLaVA's own pipeline gets wrong ("size mismatch ...
torch.Size([0])").
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

from pipeline.core.config import ConfigError, RunConfig

# Filled from the YAML; ds_config.json must leave them "auto" (or out).
OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)
# ... and inside zero_optimization: the stage is train.zero_stage's (one owner per key)
OWNED_ZERO = ("stage",)


def load_ds_json(path: str) -> dict:
    with open(path) as f:
        ds = json.load(f)
    zero = ds.get("zero_optimization", {})
    owned = [(k, ds) for k in OWNED] + [(f"zero_optimization.{k}", zero) for k in OWNED_ZERO]
    for key, section in owned:
        name = key.rsplit(".", 1)[-1]
        if name in section and section[name] != "auto":
            raise ConfigError(
                f"config error at '{path}:{key}': set it in the run YAML (train.*); "
                'ds_config.json must leave it "auto"'
            )
    return ds


def use_bf16(run: RunConfig, cuda: bool) -> bool:
    # CPU runs are fp32: bf16 autocast on CPU is not what DeepSpeed's CPU path tests.
    return run.train.precision == "bf16" or (run.train.precision == "auto" and cuda)


def use_autocast(run: RunConfig, cuda: bool) -> bool:
    """bf16 autocast over fp32 weights: `bf16-autocast` always, `autocast-native` on CUDA or on a CPU
    with native bf16 matmuls (AVX512-BF16 or AMX). Without them torch emulates bf16: 17.7 s per step
    of the embedded default's sft on an AVX2-only EPYC against 2.7 s in fp32 (docs/RESULTS.md)."""
    if run.train.precision != "autocast-native":
        return run.train.precision == "bf16-autocast"
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent means unknown, no
    return cuda or any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def build_ds_config(run: RunConfig, *, world_size: int, total_steps: int, hidden_size: int, cuda: bool) -> dict:
    """The complete DeepSpeed config for this run (no "auto" left)."""
    t = run.train
    ds = copy.deepcopy(load_ds_json(t.ds_config))
    ds["train_micro_batch_size_per_gpu"] = run.data.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = run.data.batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = t.grad_clip
    # The lr here is the LM group's; the ATP group carries its own lr in its param group
    # (pipeline/train/trainer.py `_param_groups`), which DeepSpeed's optimizer and the client LambdaLR
    # (`lr_schedule`) both respect.
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": t.lr_lm,
            "betas": list(t.betas),
            "eps": t.eps,
            "weight_decay": t.weight_decay,
            # fused/CPU-Adam kernels are GPU or JIT-compiled builds; CPU runs use torch's AdamW
            "torch_adam": not cuda,
        },
    }
    # The schedule is the client's (`lr_schedule`, a torch LambdaLR that DeepSpeed steps
    # and checkpoints): DeepSpeed's WarmupCosineLR spends the first two steps at lr 0.
    ds.pop("scheduler", None)
    bf16 = use_bf16(run, cuda)
    ds.setdefault("bf16", {})["enabled"] = bf16
    if "fp16" in ds:
        ds["fp16"]["enabled"] = False
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = t.zero_stage
    # The HF-Trainer rule of thumb for the size knobs, from the LM width.
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if t.zero_stage != 3:  # stage-3 keys confuse lower stages' validation
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ConfigError(f"config error at '{t.ds_config}': no rule fills {left}")
    return ds


def lr_schedule(run: RunConfig, total_steps: int):
    """Optimizer -> LambdaLR: linear warmup over ceil(warmup_ratio * total) steps (step 1
    already at 1/warmup of the lr), then cosine to `min_lr_ratio`; the factor applies to
    each param group's own lr (LM and ATP)."""
    import torch

    warmup = max(1, math.ceil(run.train.warmup_ratio * total_steps))
    floor = run.train.min_lr_ratio

    def factor(done: int) -> float:  # `done` optimizer steps taken before this one
        if done < warmup:
            return (done + 1) / warmup
        progress = min(1.0, (done - warmup + 1) / (total_steps - warmup + 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@contextlib.contextmanager
def zero3_enabled(ds_config: dict):
    """While inside, transformers builds and loads models ZeRO-3-partitioned (when the
    config's stage is 3); outside, plain. transformers keeps only a weak reference."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    holder = HfDeepSpeedConfig(ds_config)
    try:
        yield holder
    finally:
        unset_hf_deepspeed_config()
        del holder
