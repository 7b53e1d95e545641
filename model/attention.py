"""The attention function the decoder layers call, registered with transformers' AttentionInterface.

The decoder loop passes each group of layers' keys as a structured `kernels.KeyMask`
(`atp_keys`): live keys, the soft mask's `log m` (METHOD sec 4) and the kernel chosen for them
(`attn_kernel` in the config). The SDPA reference reads the dense additive bias the KeyMask
carries (also passed as `attention_mask`, so stock attention functions still work); flash-attn,
FlexAttention and the channel kernel read the structured mask and never build L x L; the packed
hard path (`packed.PackedKeys`, kernel "varlen") attends per sample over packed tokens. In the layer before an ATP
module the function also computes the block-wise redundancy scores from this layer's own q/k
(`scores.redundancy_scores`): under ZeRO-3 a layer's weights exist only inside its own forward,
and the q/k are already rotated here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels, packed
from .scores import redundancy_scores

ATTN_IMPLEMENTATION = "atp_sdpa"


@dataclass
class ScoreRequest:
    """Rows and weights the scores need; `result` is filled with (S_self, S_cross) by the attention call."""

    vis_index: torch.Tensor  # [B, Lv] index of each original visual token in the current sequence
    vis_weight: torch.Tensor  # [B, Lv] cumulative mask (0 = already pruned)
    seq_weight: torch.Tensor  # [B, L] the same at each visual token's position in the sequence, 0 for text
    q_index: torch.Tensor  # [B, Q] query-text rows
    q_valid: torch.Tensor  # [B, Q]
    result: tuple | None = None
    # what to compute from the layer's q/k (same arguments as `scores.redundancy_scores`, the default);
    # training-free baselines ask for `scores.visual_attention` instead
    compute: Callable | None = None
    clock: object | None = None  # the model's `pruning.PruningClock`, if any: the scores' time goes there


def atp_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, atp_scores=None, atp_keys=None, **kwargs
):
    kernel = "sdpa" if atp_keys is None else atp_keys.kernel
    if atp_scores is not None:
        with atp_scores.clock.measure() if atp_scores.clock is not None else contextlib.nullcontext():
            _scores(atp_scores, kernel, query, key, value, attention_mask, atp_keys, scaling)
    if kernel == "varlen":
        return packed.varlen_attention(query, key, value, atp_keys, scaling, dropout), None
    if kernel == "flash":
        return kernels.flash_attention(query, key, value, atp_keys.live, scaling, dropout), None
    if kernel == "channel":
        return kernels.channel_attention(query, key, value, atp_keys.key_bias, scaling, dropout), None
    if kernel == "flex" and dropout == 0.0:  # FlexAttention has no dropout
        return kernels.flex_masked_attention(query, key, value, atp_keys.block_mask, atp_keys.log_m_pad, scaling), None
    if attention_mask is None and atp_keys is not None:  # flex asked for dropout: the reference, with gradient
        attention_mask = kernels.dense_bias(atp_keys.live, atp_keys.log_m, atp_keys.dtype, atp_keys.q_len)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _scores(atp_scores, kernel, query, key, value, attention_mask, atp_keys, scaling):
    """Fill `atp_scores.result` from this layer's q/k (and v, for a compute that reads it)."""
    rows = atp_scores.q_index
    if atp_keys is not None:  # the mask of the query rows alone: built for them off the SDPA path
        bias = atp_keys.score_bias(rows)
    else:
        bias = attention_mask.expand(rows.shape[0], 1, -1, -1)
        bias = bias.gather(2, rows[:, None, :, None].expand(-1, 1, -1, bias.shape[-1]))
    compute = atp_scores.compute if atp_scores.compute is not None else redundancy_scores
    # the score blocks index the padded layout: the packed path lays its q/k/v out that way for them
    # (value only for a compute that may read it: the default's S_self does not)
    sq, sk, sv = query, key, value
    if kernel == "varlen":
        sq, sk = atp_keys.padded(query), atp_keys.padded(key)
        sv = None if atp_scores.compute is None else atp_keys.padded(value)
    atp_scores.result = compute(
        sq,
        sk,
        bias,
        scaling,
        atp_scores.vis_index,
        atp_scores.vis_weight,
        atp_scores.q_index,
        atp_scores.q_valid,
        value=sv,
        seq_weight=atp_scores.seq_weight,
    )


AttentionInterface.register(ATTN_IMPLEMENTATION, atp_attention)
