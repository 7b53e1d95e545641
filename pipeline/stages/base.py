"""Stage `base` (the embedded default only): the tiny LLaVA that stands in for LLaVA-1.5.

No pretrained weights can be downloaded here, so this stage trains `model.scratch` (HF
CLIPVisionModel + projector + Llama, real classes) from scratch on its own synthetic train
shards, with the sft loop (pipeline.train.trainer.train) and pruning off, and writes the parts
in LLaVA-1.5's release layout, which the `projector` stage then reads with `source: parts`:

    run_dir/base/llama/              LlamaForCausalLM + the word tokenizer
    run_dir/base/clip/               CLIPVisionModel + CLIPImageProcessor
    run_dir/base/mm_projector.bin    keys model.mm_projector.{0,2}.{weight,bias}

With `base.weights` set (embedded/base, committed) the parts are copied after checking
that they are the architecture `model.scratch` describes. With `base.init` set, training
starts from those parts instead of a scratch init (a further round on fresh shards).
Commands: embedded/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.core.config import RunConfig
from pipeline.core.distributed import barrier, use_cuda
from pipeline.eval.records import Record
from pipeline.stages import Context, is_done, mark_done
from pipeline.train import build, checkpoint, trainer
from pipeline.train.ds import build_ds_config

log = logging.getLogger(__name__)
PARTS = ("llama", "clip", "mm_projector.bin")


def run(run: RunConfig, ctx: Context, out: Path) -> bool:
    if run.base.weights:
        if ctx.dist.rank == 0:
            copy_committed(run, Path(run.base.weights), out)
        barrier()
        return True
    base = base_run(run, out)
    if ctx.dist.rank == 0 and not (out / "shards" / "sizes.json").exists():
        from shards import synthetic

        synthetic.write(
            str(out / "shards"),
            "train",
            run.base.train_samples,
            run.base.seed,
            shard_options(run),
            run.synthetic.maxcount,
        )
    barrier()
    init = out / "init"
    if not is_done(init):
        _build_init(base, ctx, init)
    if not trainer.train(base, ctx, out / "train", init, tb_dir=Path(run.run_dir) / "tb" / "base"):
        return False
    if ctx.dist.rank == 0:
        state = checkpoint.consolidated_state_dict(out / "train" / checkpoint.DIRNAME)
        checkpoint.require_finite(state, str(out / "train" / checkpoint.DIRNAME))
        write_parts(state, init, out)
        write_model_dir(state, init, out / "model")
        evaluate_base(run, out)
    barrier()
    return True


def shard_options(run: RunConfig):
    """shards.synthetic.Options of the base's shards: `base.synthetic` at the scratch image size."""
    import dataclasses

    from shards import synthetic

    known = {f.name for f in dataclasses.fields(synthetic.Options)} - {"image_size"}
    unknown = set(run.base.synthetic) - known
    if unknown:
        raise ValueError(f"config error at 'base.synthetic': unknown {sorted(unknown)}; known {sorted(known)}")
    opts = dict(run.base.synthetic)
    if "qtypes" in opts:
        opts["qtypes"] = tuple(opts["qtypes"])
    return synthetic.Options(image_size=run.model.scratch.image_size, **opts)


def base_run(run: RunConfig, out: Path) -> RunConfig:
    """The run config of the base training: a scratch model (or the `base.init` parts),
    nothing frozen, no pruning, its own shards, then `base.overrides` (batch size, lr,
    steps, precision)."""
    if run.base.init:
        init = Path(run.base.init)
        missing = [p for p in PARTS if not (init / p).exists()]
        if missing:
            raise FileNotFoundError(f"config error at 'base.init': {init} lacks {missing}")
        source = {
            "source": "parts",
            "llama_dir": str(init / "llama"),
            "clip_dir": str(init / "clip"),
            "mm_projector": str(init / "mm_projector.bin"),
        }
    else:
        source = {"source": "scratch"}
    cfg = OmegaConf.merge(
        OmegaConf.structured(run),
        {
            "model": {**source, "freeze_vision": False, "freeze_lm": False},
            "atp": {"pruning": "none"},
            "data": {"shards": str(out / "shards")},
        },
        run.base.overrides,
    )
    return OmegaConf.to_object(cfg)


def _build_init(base: RunConfig, ctx: Context, init: Path) -> None:
    from transformers import set_seed

    set_seed(base.seed)
    config, tokenizer, image_processor, tensors = build.source_parts(base)
    ds = build_ds_config(
        base, world_size=ctx.dist.world_size, total_steps=1, hidden_size=config.text_config.hidden_size, cuda=use_cuda()
    )
    model = build.instantiate(config, tensors, ds, torch.float32)
    build.save_pretrained_dir(model, tokenizer, image_processor, init)
    mark_done(init)
    barrier()


def write_model_dir(state: dict, init: Path, out: Path) -> None:
    """The trained base as one unpruned AtpLlava dir, for `python -m pipeline eval`."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration

    config = AtpLlavaConfig.from_pretrained(init)
    config.pruning = "none"
    model = AtpLlavaForConditionalGeneration(config)
    # the base trains without pruning: its ATP modules keep their init (unused at pruning=none)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("atp_modules.") and "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"base model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    build.save_pretrained_dir(model, AutoTokenizer.from_pretrained(init), AutoImageProcessor.from_pretrained(init), out)


def evaluate_base(run: RunConfig, out: Path) -> dict | None:
    """Score the base against its bar (base_goals): unpruned and random pruning at
    the smallest eval budget, on the eval shards, into out/eval/report.{json,md}."""
    from pipeline.data.loader import list_shards
    from pipeline.eval.evaluate import evaluate_checkpoints
    from pipeline.eval.methods import UNPRUNED

    e = run.eval
    try:
        found = all(Path(u).exists() for u in list_shards(e.shards))
    except (FileNotFoundError, ValueError):
        found = False
    if not found:
        log.warning("no eval shards at %s: base not evaluated (run the shards stage first)", e.shards)
        return None
    # the run's eval settings, narrowed to random pruning at the smallest budget, timed once
    settings = dataclasses.replace(e, budgets=[min(e.budgets)], methods=["random"], timing_repeats=1, overlay_images=0)
    report = evaluate_checkpoints(
        {UNPRUNED: str(out / "model")}, out / "eval", settings, title="base", base_bar=base_goals
    )
    goals = report["summary"]["base"]
    log.info(
        "base: coarse %.3f fine %.3f, every qtype above prior: %s, random %.0f%% drop %s; bar met: %s",
        goals["coarse"] or 0,
        goals["fine"] or 0,
        goals["every_qtype_above_prior"],
        100 * goals.get("random_budget", 0),
        {k: round(v, 3) for k, v in goals.get("random_drop", {}).items()},
        goals["met"],
    )
    return goals


def base_goals(records: list[Record], prior: dict) -> dict:
    """The embedded base's bar: unpruned coarse >= 0.95 and fine >= 0.85, every
    question type above its no-image prior, and random pruning at the smallest budget losing
    >= 10 points on fine and less on coarse (else the benchmark does not discriminate)."""
    from pipeline.eval.methods import UNPRUNED

    ref = next((r for r in records if r.method == UNPRUNED), None)
    if ref is None:
        return {}
    fam, qt = ref.accuracy_by_family, ref.accuracy_by_qtype
    out = {
        "coarse": fam.get("coarse"),
        "fine": fam.get("fine"),
        "qtype_margin_over_prior": {q: a - prior["qtype"][q] for q, a in qt.items() if q in prior["qtype"]},
    }
    out["every_qtype_above_prior"] = all(m > 0 for m in out["qtype_margin_over_prior"].values())
    randoms = [r for r in records if r.method == "random" and r.budget is not None]
    if randoms:
        r = min(randoms, key=lambda r: r.budget)
        drop = {f: fam[f] - a for f, a in r.accuracy_by_family.items() if f in fam}
        out["random_budget"] = r.budget
        out["random_drop"] = drop
        if "fine" in drop and "coarse" in drop:
            out["discriminates"] = drop["fine"] >= 0.10 and drop["coarse"] < drop["fine"]
    out["met"] = bool(
        (out["coarse"] or 0) >= 0.95
        and (out["fine"] or 0) >= 0.85
        and out["every_qtype_above_prior"]
        and out.get("discriminates", False)
    )
    return out


def write_parts(state: dict, init: Path, out: Path) -> None:
    """The trained LLaVA as LLaVA-1.5's three parts (fp32 safetensors + the projector .bin)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from model import AtpLlavaConfig
    from model.loading import model_to_part

    config = AtpLlavaConfig.from_pretrained(init)
    parts = {"llama": {}, "clip": {}, "projector": {}}
    for key, value in state.items():
        where = model_to_part(key)
        if where is not None:
            parts[where[0]][where[1]] = value
    tmp = out / "parts.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, cls, sub in (
        ("llama", LlamaForCausalLM, config.text_config),
        ("clip", CLIPVisionModel, config.vision_config),
    ):
        model = cls(sub)
        missing, unexpected = model.load_state_dict(parts[name], strict=False)
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            raise RuntimeError(f"base {name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        model.save_pretrained(tmp / name, safe_serialization=True)
    AutoTokenizer.from_pretrained(init).save_pretrained(tmp / "llama")
    AutoImageProcessor.from_pretrained(init).save_pretrained(tmp / "clip")
    torch.save(parts["projector"], tmp / "mm_projector.bin")
    _put_parts(tmp, out)  # the previous parts are replaced only once the new ones are complete
    shutil.rmtree(tmp)
    log.info("base parts written to %s", out)


def copy_committed(run: RunConfig, src: Path, out: Path) -> None:
    """Copy committed parts, refusing ones that are not the configured architecture."""
    s = run.model.scratch
    want = {
        "llama": {
            "hidden_size": s.hidden_size,
            "num_hidden_layers": s.num_layers,
            "num_attention_heads": s.num_heads,
            "num_key_value_heads": s.num_kv_heads,
            "intermediate_size": s.intermediate_size,
        },
        "clip": {
            "hidden_size": s.vision_hidden_size,
            "num_hidden_layers": s.vision_layers,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
        },
    }
    for part, fields in want.items():
        path = src / part / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"config error at 'base.weights': {path} missing (expected {PARTS} in {src})")
        have = json.loads(path.read_text())
        diff = {k: (v, have.get(k)) for k, v in fields.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"config error at 'base.weights': {src / part} is not model.scratch "
                f"(field: (configured, committed)) {diff}; train a new base with base.weights=null"
            )
    _put_parts(src, out)


def _put_parts(src: Path, out: Path) -> None:
    """Copy the three parts from `src` into `out`, replacing what is there."""
    for name in PARTS:
        dest = out / name
        if dest.is_dir():
            shutil.rmtree(dest)
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dest)
