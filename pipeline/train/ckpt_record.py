"""What a checkpoint was saved with, and whether this run can load it (pipeline/train/checkpoint.py).

A tag's COMPLETE marker records the run it came from (`record`): the world size, the ZeRO
stage, every parameter's full shape and the frozen ones. DeepSpeed can only load a tag into
the same layout: another world size or ZeRO stage repartitions the optimizer state, another
shape or frozen set changes the tensors and param groups. Those are the run's configuration,
not damage to the files, so `differences` names them before anything is loaded and nothing
is set aside.

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


def record(module, world_size: int, zero_stage: int) -> dict:
    """This run's layout. Under ZeRO-3 a parameter's full shape is `ds_shape` (its `shape` is
    the local partition, empty on most ranks)."""
    params = dict(module.named_parameters())
    return {
        "world_size": int(world_size),
        "zero_stage": int(zero_stage),
        "shapes": {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params.items()},
        "frozen": sorted(n for n, p in params.items() if not p.requires_grad),
    }


def inferred(files: list[str]) -> dict:
    """A record from DeepSpeed's file names alone (markers from before `saved_with`): the
    world size (None for ZeRO-0 in fp32: one file, any world size) and the possible stages."""
    dp_ranks = {int(m.group(2)) for f in files if (m := OPTIM_RE.match(f))}
    zero3 = any(ZERO3_MODEL_RE.match(f) for f in files)
    stages = [3] if zero3 else ([0, 1, 2] if dp_ranks else [0])
    return {"world_size": len(dp_ranks) or None, "zero_stages": stages}


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between the run a tag was saved with and this one, in words; [] if it loads."""
    out = []
    if saved.get("world_size") is not None and saved["world_size"] != now["world_size"]:
        out.append(f"world size {saved['world_size']} when saved, {now['world_size']} now")
    stages = saved.get("zero_stages") or [saved["zero_stage"]]
    if now["zero_stage"] not in stages:
        was = " or ".join(map(str, stages))
        out.append(f"ZeRO stage {was} when saved, {now['zero_stage']} now")
    if "shapes" in saved:
        out += _shape_differences(saved["shapes"], now["shapes"])
    if "frozen" in saved and saved["frozen"] != now["frozen"]:
        was, new = set(saved["frozen"]), set(now["frozen"])
        out.append(
            f"frozen parameters differ: {_names(was - new)} trainable now, {_names(new - was)} frozen now "
            "(model.freeze_*)"
        )
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
