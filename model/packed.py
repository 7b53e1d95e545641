"""The packed hard path (`hard_layout: packed`): a ragged eval batch held as [1, N, D] tokens.

After hard pruning each sample keeps its own count; the padded layout (`hard_layout: padded`, the
reference) costs B x the longest sample in every later layer, this one the sum of the lengths.
Projections, FFN and rotary run on the N packed tokens (batch 1 to the stock Llama layers), and
attention is variable-length over `cu_seqlens` (`varlen_attention`). The per-token metadata of the
decoder loop (`_Seq`: positions, visual indices, query mask) stays in the small padded [B, L]
layout; a `Packing` maps between the two. The KV cache holds each group's packed keys, one
contiguous segment per sample, and decoding inserts each sample's new tokens at the end of its
segment (`DecodeCache`), so decoding also reads only the kept keys.

This file is copied into exported checkpoints (trust_remote_code): relative imports only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import dense_bias, flash_available


@dataclass
class Packing:
    """Which positions of a padded [B, L] layout are packed, in order (row by row)."""

    index: torch.Tensor  # [N] flat positions in B * L
    cu: torch.Tensor  # [B + 1] int32 cumulative lengths (on the device: no host copy)
    lens: list  # [B] host ints: read once with the one sync of a pruning point
    live: torch.Tensor  # [B, L] bool, the padded layout's live tokens

    @classmethod
    def build(cls, live, lens):
        n = sum(lens)
        index = torch.nonzero_static(live.flatten(), size=n).flatten()  # static size: no host sync
        cu = F.pad(live.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        return cls(index=index, cu=cu, lens=list(lens), live=live)

    @property
    def shape(self):
        return self.live.shape

    def pack(self, x):
        """[B, L, ...] -> [N, ...]."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):
        """[N, ...] -> [B, L, ...], zeros in the rows that are not packed."""
        B, L = self.shape
        out = x.new_zeros(B * L, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(B, L, *x.shape[1:])

    def rows(self):
        """[B, L]: the packed row of each padded position (0 where not packed)."""
        B, L = self.shape
        rows = torch.zeros(B * L, dtype=torch.long, device=self.index.device)
        return rows.index_copy(0, self.index, torch.arange(self.index.numel(), device=rows.device)).view(B, L)


@dataclass
class PackedKeys:
    """What one group of layers attends over on the packed path: per sample, its queries (a segment
    of the packed queries) see the causal prefix of its keys (a segment of the packed keys)."""

    cu_q: torch.Tensor  # [B + 1] int32
    cu_k: torch.Tensor  # [B + 1] int32
    lens_q: list  # host ints
    lens_k: list
    packing: Packing | None = None  # prefill only: the padded layout, for the score blocks
    dtype: torch.dtype | None = None
    kernel: str = "varlen"
    dense: None = None  # no dense bias: stock attention functions cannot read this layout
    prefill_causal: bool = False  # every sample's queries are all its keys (prefill): plain causal

    @classmethod
    def prefill(cls, packing, dtype):
        return cls(packing.cu, packing.cu, packing.lens, packing.lens, packing, dtype, prefill_causal=True)

    def score_bias(self, rows):
        """The padded layout's bias on the query rows `rows` [B, Q], for the block-wise scores of the
        layer before a pruning point."""
        return dense_bias(self.packing.live, None, self.dtype, rows=rows)

    def padded(self, x):
        """[1, heads, N, d] -> [B, heads, L, d] in the padded layout (zeros where not live)."""
        return self.packing.unpack(x[0].transpose(0, 1)).transpose(1, 2)


def varlen_attention(q, k, v, keys, scaling, dropout=0.0):
    """q [1, H, Nq, d], k / v [1, Hkv, Nk, d] packed per `keys` -> [1, Nq, H, d]; causal inside each
    sample, queries being the last keys of their sample (bottom-right, as in decoding).

    CUDA fp16 / bf16: flash-attn's varlen kernel when installed, else torch's `varlen_attn`. Elsewhere
    (CPU, fp32): one SDPA call per sample on its segments, exact and with no cross-sample work."""
    H, Hkv = q.shape[1], k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))  # [N, heads, d]
        max_q, max_k = max(keys.lens_q), max(keys.lens_k)
        if flash_available():
            from flash_attn import flash_attn_varlen_func

            out = flash_attn_varlen_func(
                qt, kt, vt, keys.cu_q, keys.cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True
            )
            return out[None]
        if dropout == 0.0:
            from torch.nn.attention.varlen import varlen_attn

            out = varlen_attn(
                qt, kt, vt, keys.cu_q, keys.cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0), enable_gqa=H != Hkv
            )
            return out[None]
    outs, sq, sk = [], 0, 0
    # is_causal from a flag of the keys, not from the lengths: under torch.compile(dynamic=True) they are
    # symbolic and SDPA takes no symbolic bool
    for lq, lk in zip(keys.lens_q, keys.lens_k):
        mask = None
        if not keys.prefill_causal and lq > 1:  # SDPA's is_causal aligns top-left; queries are the last keys
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(lq, lk)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, sq : sq + lq],
                k[:, :, sk : sk + lk],
                v[:, :, sk : sk + lk],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=keys.prefill_causal,
                scale=scaling,
                enable_gqa=H != Hkv,
            )
        )
        sq, sk = sq + lq, sk + lk
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).transpose(1, 2)


class DecodeCache:
    """The KV cache the layers see during a packed decode step: `update` puts each sample's q new keys
    at the end of its segment of the layer's packed keys (one copy of the layer's cache, as the
    stock cache's concatenation makes) and returns the whole packed keys."""

    def __init__(self, cache, group_of_layer, dests):
        self.cache, self.group_of_layer, self.dests = cache, group_of_layer, dests

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        old_dest, new_dest = self.dests[self.group_of_layer[layer_idx]]
        out = []
        for old, new in ((layer.keys, key_states), (layer.values, value_states)):
            t = old.new_empty(*old.shape[:2], old.shape[2] + new.shape[2], old.shape[3])
            out.append(t.index_copy_(2, old_dest, old).index_copy_(2, new_dest, new))
        layer.keys, layer.values = out
        return layer.keys, layer.values


def decode_groups(groups, q):
    """One decode step of q tokens per sample: each group's keys after the step, and where its old
    and new keys go ((old_dest [N], new_dest [B * q]) for `DecodeCache`). groups: [(cu, lens)]."""
    keys, dests, after = [], [], []
    for cu, lens in groups:
        B, n = len(lens), sum(lens)
        dev = cu.device
        step = torch.arange(B + 1, device=dev, dtype=torch.int32) * q
        seg = torch.repeat_interleave(torch.arange(B, device=dev), (cu[1:] - cu[:-1]).long(), output_size=n)
        new_cu = cu + step
        old_dest = torch.arange(n, device=dev) + q * seg
        new_dest = (new_cu[1:, None].long() - q + torch.arange(q, device=dev)).flatten()
        new_lens = [n_b + q for n_b in lens]
        keys.append(PackedKeys(step, new_cu, [q] * B, new_lens))
        dests.append((old_dest, new_dest))
        after.append((new_cu, new_lens))
    return keys, dests, after
