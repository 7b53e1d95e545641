"""Tiny LLaVA-architecture models and batches for the model tests (CPU, fp32, random weights)."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from model import AtpLlavaForConditionalGeneration

VOCAB = 120
IMAGE_TOKEN = 119
GRID = 4  # 32 px / patch 8
LV = GRID * GRID


def tiny_llava_config(
    layers=6, kv_heads=2, grid=GRID, vocab=VOCAB, image_token=IMAGE_TOKEN, max_positions=256, text=None, **kw
):
    """A tiny LLaVA config: a grid x grid CLIP (patch 8) and a Llama; `text`: more text_config fields."""
    return LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=grid * 8,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=max_positions,
            **(text or {}),
        ),
        image_token_id=image_token,
        image_seq_length=grid * grid,
        **kw,
    )


def tiny_llava(seed=0, **kw):
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**kw)).eval()


def tiny_atp(seed=0, atp_layers=(2, 4), llava_kw=None, **atp):
    atp.setdefault("target_tokens", LV * 0.5)
    atp.setdefault("threshold_hidden", 32)
    atp.setdefault("spatial_strides", [2, 3])
    llava = tiny_llava(seed, **(llava_kw or {}))
    return llava, AtpLlavaForConditionalGeneration.from_llava(llava, atp_layers=list(atp_layers), **atp)


def make_batch(prefixes, suffixes, answers=None, padding="left", seed=0, text_only=()):
    """One image per sample (unless its index is in text_only): [prefix text] <image>*LV [suffix text] [answer].

    Returns input_ids, attention_mask, labels (answers supervised), pixel_values.
    """
    g = torch.Generator().manual_seed(seed)
    rows, labs = [], []
    for b, (p, s) in enumerate(zip(prefixes, suffixes)):
        ans = answers[b] if answers else 0
        img = [] if b in text_only else [IMAGE_TOKEN] * LV
        ids = (
            torch.randint(1, 100, (p,), generator=g).tolist()
            + img
            + torch.randint(1, 100, (s + ans,), generator=g).tolist()
        )
        lab = [-100] * (len(ids) - ans) + ids[len(ids) - ans :]
        rows.append(ids)
        labs.append(lab)
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (r, lab) in enumerate(zip(rows, labs)):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
    n_img = len(rows) - len(text_only)
    pix = torch.randn(n_img, 3, 32, 32, generator=g) if n_img else None
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pix)


def saved_bytes(model, inputs) -> int:
    """Bytes autograd saves for backward in one forward (distinct storages, parameters excluded;
    under gradient checkpointing only what stays outside the checkpointed regions)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)
