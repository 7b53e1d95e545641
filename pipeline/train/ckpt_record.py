"""What a checkpoint was saved with, and whether this run can load it (pipeline/train/checkpoint.py).

A tag's COMPLETE marker records the run it came from (`record`): the world size, the ZeRO
stage, the global batch, the model's architecture (`architecture`), every parameter's full
shape and the frozen ones, and the data stream's identity (data seed, shard list). Another ZeRO
stage, shape, frozen set or architecture cannot be loaded; another global batch would change
what a step means (the data position, the LR schedule's length) and is refused unless the run
allows it (`train.allow_batch_change`); another data seed or shard list would make the saved
position a place in another stream (a resume would silently see other samples). Another world
size under ZeRO-3 (both runs) is loaded through DeepSpeed's universal checkpoint (`reshaped`);
under other stages it is refused. Those are the run's configuration, not damage to the files,
so `differences` names them before anything is loaded and nothing is set aside.

Markers written before the record existed carry no `saved_with`: DeepSpeed's own file names
still tell the world size (one `*zero_pp_rank_R_*optim_states.pt` per data-parallel rank)
and whether the stage was 3 (per-rank `zero_pp_rank_R_*model_states.pt`); the shapes are not
known there and are not compared.
"""

from __future__ import annotations

import math
import re

OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")
SHOWN = 3  # differing parameters named per kind; the rest are counted


def record(module, world_size: int, zero_stage: int, global_batch: int | None = None, data: dict | None = None) -> dict:
    """This run's layout. Under ZeRO-3 a parameter's full shape is `ds_shape` (its `shape` is
    the local partition, empty on most ranks). `data`: the stream's identity
    (`DataStream.identity`: seed, shards)."""
    params = dict(module.named_parameters())
    rec = {
        "world_size": int(world_size),
        "zero_stage": int(zero_stage),
        "global_batch": None if global_batch is None else int(global_batch),
        "shapes": {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params.items()},
        "frozen": sorted(n for n, p in params.items() if not p.requires_grad),
    }
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "text_config"):
        rec["architecture"] = architecture(config)
    if data is not None:
        rec["data"] = data
    return rec


def architecture(config) -> dict:
    """What fixes the model's computation beyond the parameter shapes (an AtpLlavaConfig):
    where the ATP modules sit, the attention layout, the visual tokens. Loss weights and
    temperatures are training settings and may change on a resume."""
    text, vision = config.text_config, config.vision_config
    keys = {
        "text": ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
        "vision": ("num_hidden_layers", "hidden_size", "image_size", "patch_size"),
    }
    parts = (("text", text), ("vision", vision))
    out = {f"{part}.{k}": getattr(cfg, k, None) for part, cfg in parts for k in keys[part]}
    for k in ("atp_layers", "spatial_strides", "pruning", "vision_feature_layer", "vision_feature_select_strategy"):
        out[k] = getattr(config, k, None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def inferred(files: list[str]) -> dict:
    """A record from DeepSpeed's file names alone (markers from before `saved_with`): the
    world size (None for ZeRO-0 in fp32: one file, any world size) and the possible stages."""
    dp_ranks = {int(m.group(2)) for f in files if (m := OPTIM_RE.match(f))}
    zero3 = any(ZERO3_MODEL_RE.match(f) for f in files)
    stages = [3] if zero3 else ([0, 1, 2] if dp_ranks else [0])
    return {"world_size": len(dp_ranks) or None, "zero_stages": stages}


def reshaped(saved: dict, now: dict) -> bool:
    """Whether loading needs DeepSpeed's universal checkpoint: another world size."""
    return saved.get("world_size") is not None and saved["world_size"] != now["world_size"]


def differences(saved: dict, now: dict, allow_batch_change: bool = False) -> list[str]:
    """What differs between the run a tag was saved with and this one that stops it from
    loading, in words; [] if it loads (directly, or `reshaped`)."""
    out = []
    stages = saved.get("zero_stages") or [saved["zero_stage"]]
    if reshaped(saved, now) and (stages != [3] or now["zero_stage"] != 3):
        out.append(
            f"world size {saved['world_size']} when saved, {now['world_size']} now "
            "(another world size is resumed under ZeRO-3 only)"
        )
    if now["zero_stage"] not in stages:
        was = " or ".join(map(str, stages))
        out.append(f"ZeRO stage {was} when saved, {now['zero_stage']} now")
    was_batch = saved.get("global_batch")
    if not allow_batch_change and now.get("global_batch") is not None:
        if was_batch is not None and was_batch != now["global_batch"]:
            out.append(
                f"global batch {was_batch} when saved, {now['global_batch']} now (data.batch_size x "
                "train.grad_accum x world size; keep it, e.g. double grad_accum on half the ranks, or "
                "allow it with train.allow_batch_change=true)"
            )
        elif was_batch is None and reshaped(saved, now):
            out.append(
                f"world size {saved['world_size']} when saved, {now['world_size']} now, and the checkpoint does "
                "not record its global batch: allow it with train.allow_batch_change=true if it is unchanged"
            )
    if "architecture" in saved and "architecture" in now:
        changed = [k for k in saved["architecture"] if saved["architecture"][k] != now["architecture"].get(k)]
        if changed:
            shown = ", ".join(f"{k} {saved['architecture'][k]} -> {now['architecture'].get(k)}" for k in changed)
            out.append(f"model architecture differs (saved -> now): {shown}")
    if "shapes" in saved:
        out += _shape_differences(saved["shapes"], now["shapes"])
    if "frozen" in saved and saved["frozen"] != now["frozen"]:
        was, new = set(saved["frozen"]), set(now["frozen"])
        out.append(
            f"frozen parameters differ: {_names(was - new)} trainable now, {_names(new - was)} frozen now "
            "(model.freeze_*)"
        )
    if "data" in saved and "data" in now:
        out += _data_differences(saved["data"], now["data"])
    return out


def _data_differences(saved: dict, now: dict) -> list[str]:
    """The data stream: another seed or shard list makes the saved position (global samples of
    the epoch) a place in another order. The batch size is the global batch's business
    (`differences`): the position is counted in samples, so the stream may be cut another way."""
    out = (
        [f"data.seed {saved['seed']} when saved, {now['seed']} now"]
        if saved.get("seed", now["seed"]) != now["seed"]
        else []
    )
    if "shards" in saved and saved["shards"] != now["shards"]:
        gone, new = (
            [s for s in saved["shards"] if s not in now["shards"]],
            [s for s in now["shards"] if s not in saved["shards"]],
        )
        what = (
            f"{_names(gone)} only then, {_names(new)} only now" if gone or new else "the same shards in another order"
        )
        out.append(f"data.shards differ ({len(saved['shards'])} shards when saved, {len(now['shards'])} now): {what}")
    return out


def estimate_bytes(rec: dict) -> int:
    """Rough size of one checkpoint of this run: 4 bytes per parameter (the weights) and 12
    more per trainable one (fp32 master copy and Adam's two moments)."""
    frozen = set(rec["frozen"])
    return sum(math.prod(shape) * (4 if name in frozen else 16) for name, shape in rec["shapes"].items())


def _shape_differences(saved: dict, now: dict) -> list[str]:
    out = []
    changed = [n for n in saved if n in now and saved[n] != now[n]]
    if changed:
        shown = ", ".join(f"{n} {saved[n]} -> {now[n]}" for n in changed[:SHOWN])
        out.append(f"{len(changed)} parameter shapes differ (saved -> now): {shown}{_more(changed)}")
    only_saved, only_now = [n for n in saved if n not in now], [n for n in now if n not in saved]
    for names, where in ((only_saved, "checkpoint"), (only_now, "model")):
        if names:
            out.append(f"{len(names)} parameters only in the {where}: {_names(names)}")
    return out


def _names(names) -> str:
    names = sorted(names)
    return (", ".join(names[:SHOWN]) + _more(names)) if names else "none"


def _more(names) -> str:
    return f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else ""
