"""LLaVA-1.5's release layout (haotian-liu/LLaVA): building ATP-LLaVA from it, and the one
mapping between its weight names and this model's, both ways (`part_to_model`, `model_to_part`).

A Vicuna/Llama dir (HF format), a CLIP dir (CLIPModel or CLIPVisionModel) and the pretrained
projector `mm_projector.bin`, whose keys are `model.mm_projector.0.weight` etc. (a
Linear-GELU-Linear Sequential; indices 0 and 2 map to llava-hf's linear_1 / linear_2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

IMAGE_TOKEN = "<image>"
PROJECTOR_KEYS = {
    "0.weight": "linear_1.weight",
    "0.bias": "linear_1.bias",
    "2.weight": "linear_2.weight",
    "2.bias": "linear_2.bias",
}
CLIP_TEXT_SIDE = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
# this model's prefix of each part (transformers 5's LLaVA names)
LM, LM_HEAD, VISION, PROJECTOR = (
    "model.language_model.",
    "lm_head.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def part_to_model(part: str, key: str) -> str | None:
    """A weight name of part "llama", "clip" or "projector" -> this model's name (None: not ours,
    e.g. a whole CLIPModel's text side). CLIP: transformers 4's `vision_model.*` or 5's flat keys."""
    if part == "llama":
        if key.startswith("model."):
            return LM + key[len("model.") :]
        return key if key == LM_HEAD + "weight" else None
    if part == "clip":
        return None if key.startswith(CLIP_TEXT_SIDE) else VISION + key.removeprefix("vision_model.")
    tail = key.split("mm_projector.")[-1]
    return PROJECTOR + PROJECTOR_KEYS[tail] if tail in PROJECTOR_KEYS else None


def model_to_part(key: str) -> tuple[str, str] | None:
    """The inverse: this model's name -> (part, name in the release layout); None: in no part."""
    if key.startswith(LM):
        return "llama", "model." + key[len(LM) :]
    if key.startswith(LM_HEAD):
        return "llama", key
    if key.startswith(VISION):
        return "clip", key[len(VISION) :]
    if key.startswith(PROJECTOR):
        index = {v: k for k, v in PROJECTOR_KEYS.items()}[key[len(PROJECTOR) :]]
        return "projector", "model.mm_projector." + index
    return None


def load_projector_state(path) -> dict:
    """mm_projector weights in llava-hf's names; `weights_only` (no pickle code) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mm_projector: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, value in raw.items():
        name = part_to_model("projector", key)
        if name is None:
            raise ValueError(
                f"{path}: unexpected projector key {key!r} (expected model.mm_projector.{{0,2}}.{{weight,bias}})"
            )
        out[name[len(PROJECTOR) :]] = value
    return out


def tokenizer_with_image_token(llama_dir, tokenizer=None):
    """The LM's tokenizer with `<image>` added as a special token if it lacks one."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(llama_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_from_parts(
    cls,
    llama_dir,
    clip_dir,
    mm_projector,
    tokenizer=None,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    **atp_fields,
):
    for name, p in (("llama_dir", llama_dir), ("clip_dir", clip_dir)):
        if not Path(p).is_dir():
            raise FileNotFoundError(f"{name}: no directory at {p}")
    tokenizer = tokenizer_with_image_token(llama_dir, tokenizer)
    llama = LlamaForCausalLM.from_pretrained(llama_dir)
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    projector = load_projector_state(mm_projector)
    config_cls = cls.config_class
    lv = (clip.config.image_size // clip.config.patch_size) ** 2
    text_config = llama.config.to_dict()
    text_config["vocab_size"] = max(len(tokenizer), llama.config.vocab_size)
    config = config_cls(
        vision_config=clip.config.to_dict(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=lv,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        pad_token_id=tokenizer.pad_token_id,
        **atp_fields,
    )
    model = cls(config).to(llama.dtype)
    if llama.config.vocab_size < config.text_config.vocab_size:
        llama.resize_token_embeddings(config.text_config.vocab_size)
    model.model.language_model.load_state_dict(llama.model.state_dict())
    model.lm_head.load_state_dict(llama.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(clip.state_dict())
    model.model.multi_modal_projector.load_state_dict(projector)
    return model
