"""Building ATP-LLaVA from the original LLaVA-1.5 parts (haotian-liu/LLaVA layout).

A Vicuna/Llama dir (HF format), a CLIP dir (CLIPModel or CLIPVisionModel) and the pretrained
projector `mm_projector.bin`, whose keys are `model.mm_projector.0.weight` etc. (a
Linear-GELU-Linear Sequential; indices 0 and 2 map to llava-hf's linear_1 / linear_2).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

IMAGE_TOKEN = "<image>"
PROJECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


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
        tail = key.split("mm_projector.")[-1]
        if tail not in PROJECTOR_KEYS:
            raise ValueError(f"{path}: unexpected projector key {key!r} (expected model.mm_projector.{{0,2}}.{{weight,bias}})")
        out[PROJECTOR_KEYS[tail]] = value
    return out


def tokenizer_with_image_token(llama_dir, tokenizer=None):
    """The LM's tokenizer with `<image>` added as a special token if it lacks one."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(llama_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_from_parts(cls, llama_dir, clip_dir, mm_projector, tokenizer=None, vision_feature_layer=-2,
                     vision_feature_select_strategy="default", **atp_fields):
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
