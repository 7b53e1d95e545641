"""The attention function the decoder layers call, registered with transformers' AttentionInterface.

The soft mask of METHOD sec 4 arrives already folded into the additive `attention_mask`
(`log m` on visual keys, built by the decoder loop), so the attention itself is plain SDPA
and its gradient reaches m. In the layer before an ATP module the function also computes
the block-wise redundancy scores from this layer's own q/k (`scores.redundancy_scores`):
under ZeRO-3 a layer's weights exist only inside its own forward, and the q/k are already
rotated here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .scores import redundancy_scores

ATTN_IMPLEMENTATION = "atp_sdpa"


@dataclass
class ScoreRequest:
    """Rows and weights the scores need; `result` is filled with (S_self, S_cross) by the attention call."""

    vis_index: torch.Tensor  # [B, Lv] index of each original visual token in the current sequence
    vis_weight: torch.Tensor  # [B, Lv] cumulative mask (0 = already pruned)
    q_index: torch.Tensor  # [B, Q] query-text rows
    q_valid: torch.Tensor  # [B, Q]
    result: tuple | None = None


def atp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, atp_scores=None, **kwargs):
    if atp_scores is not None:
        atp_scores.result = redundancy_scores(
            query, key, attention_mask, scaling,
            atp_scores.vis_index, atp_scores.vis_weight, atp_scores.q_index, atp_scores.q_valid,
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, atp_attention)
