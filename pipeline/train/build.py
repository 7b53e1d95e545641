"""Assembling ATP-LLaVA from the configured source, ZeRO-3 aware.

Sources (`model.source`):
- `parts`: LLaVA-1.5's release layout: a Vicuna/Llama dir, a CLIP dir, `mm_projector.bin`
  (keys `model.mm_projector.{0,2}.*`); `<image>` is added to the tokenizer if missing.
- `llava`: one HF LLaVA dir (llava-hf's older key layout or transformers 5's).
- `scratch`: a random tiny model with the word tokenizer (the embedded default).

Under ZeRO-3 the model is created partitioned (`_from_config` inside `zero3_enabled`,
i.e. `deepspeed.zero.Init`), so no rank ever holds all of a 7B model; each module's
weights are then written under `GatheredParameters(modifier_rank=0)`: rank 0 reads the
files and copies, DeepSpeed re-partitions on exit. Copying into a partitioned parameter
directly is what fails with "size mismatch ... torch.Size([0])". Without ZeRO-3 the same
code copies straight into the full parameters.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration
from model.loading import (
    IMAGE_TOKEN,
    PROJECTOR,
    PROJECTOR_KEYS,
    load_projector_state,
    part_to_model,
    tokenizer_with_image_token,
)
from pipeline.core.config import RunConfig, as_dict, check_model, visual_tokens
from pipeline.core.distributed import rank
from pipeline.train.ds import zero3_enabled

Tensors = dict[str, Callable[[], torch.Tensor]]  # model key -> lazy reader


def is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


# ------------------------------------------------------------------ reading checkpoints


def checkpoint_tensors(directory: str, rename: Callable[[str], str | None]) -> Tensors:
    """Lazy readers for every tensor in an HF dir (safetensors, else .bin), under the
    model key `rename(key)` (None: skip). Listing is cheap; only called readers read."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    out: Tensors = {}
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
            for key in keys:
                target = rename(key)
                if target is not None:
                    out[target] = lambda path=path, key=key: _read_safetensor(path, key)
        return out
    files = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin")
    for path in files:
        # mmap: listing the keys of a 10 GB shard must not read it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, value in state.items():
            target = rename(key)
            if target is not None:
                out[target] = lambda value=value: value
    return out


def _read_safetensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def llava_key(key: str) -> str | None:
    """llava-hf's older layout (and transformers 4's CLIP prefix) -> transformers 5's."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# ------------------------------------------------------------------ writing into the model


@torch.no_grad()
def load_gathered(model: torch.nn.Module, tensors: Tensors) -> list[str]:
    """Copy `tensors` into the model's parameters, module by module, gathering each
    module's partitions under ZeRO-3 (rank 0 writes). Returns the parameter names that
    received nothing. A source with fewer rows (the vocabulary before `<image>` was
    added) fills the first rows; the new rows get the mean of the old ones."""
    import deepspeed

    zero3 = is_zero3(model)
    writer = not zero3 or rank() == 0
    missing = []
    for prefix, module in model.named_modules():
        named = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        wanted = [p for k, p in named if k in tensors]
        missing += [k for k, _ in named if k not in tensors]
        if not wanted:
            continue
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=0, enabled=zero3):
            if writer:
                for key, param in named:
                    if key in tensors:
                        _copy(param, tensors[key](), key)
    return missing


def _copy(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    value = value.to(param.dtype)
    if value.shape == param.shape:
        param.copy_(value)
    elif value.dim() == param.dim() and value.shape[1:] == param.shape[1:] and value.shape[0] < param.shape[0]:
        n = value.shape[0]
        param[:n].copy_(value)
        param[n:].copy_(value.float().mean(0, keepdim=True).to(param.dtype).expand_as(param[n:]))
    else:
        raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's {tuple(param.shape)}")


@torch.no_grad()
def gathered_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict | None:
    """The full state dict on rank 0 (None elsewhere), gathered one module at a time so
    the peak is one module's full weights on top of the CPU copy being built."""
    import deepspeed

    zero3 = is_zero3(model)
    out = {} if (rank() == 0 or not zero3) else None
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None, enabled=zero3):
            if out is not None:
                for n, p in params:
                    t = p.detach().to("cpu", copy=True)
                    out[f"{prefix}.{n}" if prefix else n] = t.to(dtype) if dtype and t.is_floating_point() else t
        if out is not None:
            for n, b in module.named_buffers(recurse=False):
                key = f"{prefix}.{n}" if prefix else n
                if n not in module._non_persistent_buffers_set:
                    out[key] = b.detach().cpu().clone()
    return out


# ------------------------------------------------------------------ the three sources


def atp_fields(run: RunConfig) -> dict:
    fields = as_dict(run.atp)
    fields["vision_feature_layer"] = run.model.vision_feature_layer
    fields["vision_feature_select_strategy"] = run.model.vision_feature_select_strategy
    return fields


STRUCTURAL = ("atp_layers", "threshold_hidden")  # they shape parameters: fixed at `projector`


def apply_atp_fields(config: AtpLlavaConfig, run: RunConfig) -> AtpLlavaConfig:
    """The run's ATP fields onto a saved model's config, so a later stage's overrides
    (target, lambdas, temperature, pruning) take effect; shape-giving fields must match."""
    for key, value in as_dict(run.atp).items():
        old = getattr(config, key)
        if key in STRUCTURAL and list(old if isinstance(old, (list, tuple)) else [old]) != list(
            value if isinstance(value, (list, tuple)) else [value]
        ):
            raise ValueError(
                f"config error at 'atp.{key}': {value} differs from the model's {old} "
                "(set at the projector stage; rerun it with --force to change it)"
            )
        setattr(config, key, value)
    check_model(run, config.text_config.num_hidden_layers, config.num_visual_tokens)
    config.validate_atp()
    return config


def _check_size(run: RunConfig, text, vision) -> None:
    """The ATP settings against the model's size, which the load-time check may not have known
    (transformers' defaults fill what config.json leaves out); before AtpLlavaConfig, whose own
    validation would raise a plain ValueError."""
    lv = visual_tokens(vision.image_size, vision.patch_size, run.model.vision_feature_select_strategy)
    check_model(run, text.num_hidden_layers, lv)


def source_parts(run: RunConfig):
    """(config, tokenizer, image_processor, tensors) of the configured source; nothing
    is built yet, so the DeepSpeed config can be sized from `config` first."""
    src = run.model.source
    if src == "scratch":
        config, tokenizer, image_processor = _scratch_parts(run)
        tensors: Tensors = {}
    elif src == "parts":
        config, tokenizer, image_processor, tensors = _release_parts(run)
    else:
        config, tokenizer, image_processor, tensors = _llava_parts(run)
    if run.model.attn_implementation:
        config._attn_implementation = run.model.attn_implementation
    config.validate_atp()
    return config, tokenizer, image_processor, tensors


def instantiate(config, tensors: Tensors, ds_config: dict, dtype: torch.dtype):
    """The model, partitioned under ZeRO-3, with `tensors` loaded; the ATP modules keep
    the model's own `_init_weights` (METHOD sec 3: thresholds start at the target share)."""
    with zero3_enabled(ds_config):
        model = AtpLlavaForConditionalGeneration._from_config(config, dtype=dtype)
    missing = load_gathered(model, tensors) if tensors else []
    missing = [k for k in missing if not k.startswith("atp_modules.")]
    if missing:
        raise ValueError(f"no weights for {len(missing)} parameters, e.g. {missing[:4]}")
    return model


def _release_parts(run: RunConfig):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    m = run.model
    tokenizer = tokenizer_with_image_token(m.llama_dir)
    text = LlamaConfig.from_pretrained(m.llama_dir)
    vision = CLIPVisionConfig.from_pretrained(m.clip_dir)
    _check_size(run, text, vision)
    text_dict = text.to_dict()
    text_dict["vocab_size"] = max(len(tokenizer), text.vocab_size)
    config = AtpLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_dict,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        **atp_fields(run),
    )
    tensors = checkpoint_tensors(m.llama_dir, partial(part_to_model, "llama"))
    tensors.update(checkpoint_tensors(m.clip_dir, partial(part_to_model, "clip")))
    projector = load_projector_state(m.mm_projector) if rank() == 0 else None
    for name in PROJECTOR_KEYS.values():
        # only rank 0 reads (ZeRO-3 broadcasts); other ranks only need the key
        tensors[PROJECTOR + name] = lambda name=name: projector[name]
    return config, tokenizer, CLIPImageProcessor.from_pretrained(m.clip_dir), tensors


def _llava_parts(run: RunConfig):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig

    d = run.model.llava_dir
    llava = LlavaConfig.from_pretrained(d)
    src = llava.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        src.pop(key, None)
    _check_size(run, llava.text_config, llava.vision_config)
    src.update(atp_fields(run))
    config = AtpLlavaConfig(**src)
    tokenizer = AutoTokenizer.from_pretrained(d)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return config, tokenizer, AutoImageProcessor.from_pretrained(d), checkpoint_tensors(d, llava_key)


def scratch_configs(run: RunConfig, tokenizer) -> tuple[dict, dict]:
    """The text (Llama) and vision (CLIP) config dicts of `model.scratch` (the embedded default's
    shape), shared by the model build and `pipeline plan`."""
    s = run.model.scratch
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=s.vision_hidden_size,
        intermediate_size=s.vision_intermediate_size,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.hidden_size,
    )
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return text, vision


def _scratch_parts(run: RunConfig):
    from transformers import CLIPImageProcessor

    from pipeline.data.tokenizer import build_word_tokenizer

    s = run.model.scratch
    tokenizer = build_word_tokenizer()
    grid = s.image_size // s.patch_size
    text, vision = scratch_configs(run, tokenizer)
    config = AtpLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **atp_fields(run),
    )
    size = {"shortest_edge": s.image_size}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": s.image_size, "width": s.image_size})
    return config, tokenizer, image_processor


def make_processor(tokenizer, image_processor, config):
    """A LlavaProcessor, so AutoProcessor works on the saved dir and expands `<image>`
    to the model's Lv tokens (CLS counted as the one extra token, then dropped)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def save_pretrained_dir(model, tokenizer, image_processor, out_dir: str | Path, dtype=None) -> None:
    """Rank 0 writes an HF dir (config, safetensors, tokenizer, image processor,
    processor). Collective under ZeRO-3 (every rank must call)."""
    state = gathered_state_dict(model, dtype)
    if rank() != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    make_processor(tokenizer, image_processor, model.config).save_pretrained(out_dir)
