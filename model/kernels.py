"""Attention kernels behind `atp_attention`: which one runs, and the GPU paths (docs/GPU.md).

The decoder loop describes each group of layers' keys once, as a `KeyMask` (live keys, the
soft mask's `log m` or None, the query offset for causality), built by `KeyMask.build`, which
also picks the kernel (`select_kernel`) and prepares only what that kernel needs:

- "sdpa": the dense additive [B, 1, Lq, Lk] bias (the CPU reference, METHOD sec 4);
- "flash": nothing; flash-attn reads the live keys through varlen packing (`unpad`/`repad`);
- "flex": a FlexAttention block mask and the padded `log m` that `score_mod` adds, so the
  masked training layers never materialise L x L and the gradient still reaches m;
- "channel": the key bias [B, Lk] (`log m` on live keys, a finite floor on dead ones); the
  attention call appends it to k as an extra channel (q gets a constant there), so a plain causal
  flash kernel computes the masked attention and returns d log m through dK, without atomics.

flash-attn is an optional extra (`pip install '.[gpu]'`): it is imported inside functions only,
so this file (copied into exported checkpoints) never needs it.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "flash", "flex", "channel", "auto")
FLEX_BLOCK = 128  # FlexAttention's block size; padding to it avoids its NaN backward on ragged lengths
# exp(-1e4) == 0 in fp32: "off" without the dtype minimum overflowing flex's exp2, or the channel
# kernel's k channel (-1e4 / (scaling c), |c scaling| ~ 1, stays inside fp16's range)
_LOGM_FLOOR = -1e4


# -- availability probes (lazy: nothing here imports flash_attn at module import) ----------------
@functools.cache
def flash_available() -> bool:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except Exception:  # ImportError, or a wheel built against another CUDA / torch
        return False
    return True


def _torch_at_least(major, minor) -> bool:
    v = torch.__version__.split("+")[0].split(".")
    return (int(v[0]), int(v[1])) >= (major, minor)


@functools.cache
def flex_available(training: bool = True) -> bool:
    """FlexAttention exists from torch 2.5; gradients to tensors captured in score_mod from 2.6."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return _torch_at_least(2, 6) if training else True


def check_requested(requested: str) -> None:
    """At model construction: an explicit request for a missing kernel fails here, not mid-run."""
    if requested not in KERNELS:
        raise ValueError(f"attn_kernel={requested!r}: expected one of {KERNELS}")
    if requested == "flash" and not flash_available():
        raise ImportError(
            "attn_kernel='flash' needs flash-attn, which is not installed (or does not import): "
            "pip install '.[gpu]' -- or use attn_kernel='auto' to fall back to SDPA"
        )
    if requested == "flex" and not flex_available(True):
        raise ImportError(
            f"attn_kernel='flex' needs torch >= 2.6 (FlexAttention with mask gradients); found {torch.__version__}"
        )
    if requested == "auto" and torch.cuda.is_available() and not flash_available():
        warnings.warn(
            "attn_kernel='auto': flash-attn is not installed, unmasked and hard-pruned layers use SDPA "
            "(pip install '.[gpu]' for flash-attn)",
            stacklevel=2,
        )


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def select_kernel(requested: str, device, dtype: torch.dtype, masked: bool, training: bool) -> str:
    """The kernel a group of layers runs: "sdpa", "flash", "flex" or "channel".

    masked: the keys carry a soft mask (`log m`, training); flash-attn takes no additive bias
    with gradient, so masked layers use flex (auto / flex), `log m` as a q/k channel (channel) or
    the SDPA reference (flash). Unmasked layers under "channel" run as under "auto" without flex.
    "auto" never warns: falling back is what it means. An explicit request that cannot be
    honoured here (CPU tensors, fp32 for flash) falls back to SDPA with a warning, once.
    """
    if requested not in KERNELS:
        raise ValueError(f"attn_kernel={requested!r}: expected one of {KERNELS}")
    if requested == "sdpa":
        return "sdpa"
    if torch.device(device).type != "cuda":
        if requested != "auto":
            _warn_once(f"attn_kernel={requested!r} runs on CUDA only; these tensors are on {device}: using SDPA")
        return "sdpa"
    if masked:
        if requested == "channel":
            return "channel"
        if requested in ("auto", "flex") and flex_available(training):
            return "flex"
        if requested == "flash":
            _warn_once(
                "attn_kernel='flash': flash-attn has no soft-mask bias; masked layers use SDPA "
                "(attn_kernel='auto' uses FlexAttention there)"
            )
        return "sdpa"
    if requested == "flex":
        return "flex" if flex_available(training) else "sdpa"
    if dtype in (torch.float16, torch.bfloat16) and flash_available():
        return "flash"
    if requested == "flash":
        _warn_once(f"attn_kernel='flash' needs fp16/bf16 (got {dtype}) and flash-attn: using SDPA")
    return "sdpa"


# -- the structured mask the decoder loop passes ----------------------------------------------
def dense_bias(live, log_m, dtype, q_len=None, rows=None):
    """The SDPA reference's additive [B, 1, Lq, Lk] mask: causal (query i sits at key Lk - Lq + i),
    dead keys off, `log m` on the rest. Dead rows see themselves so they stay finite (unused).
    rows [B, Q]: only those query rows ([B, 1, Q, Lk]; the block-wise scores need no more)."""
    B, Lk = live.shape
    Lq = Lk if q_len is None else q_len
    qpos = (torch.arange(Lk - Lq, Lk, device=live.device)[None] if rows is None else rows + (Lk - Lq))[..., None]
    kpos = torch.arange(Lk, device=live.device)
    allowed = ((kpos <= qpos) & live[:, None, :]) | (kpos == qpos)
    fill = log_m[:, None, :].to(dtype) if log_m is not None else torch.zeros((), dtype=dtype, device=live.device)
    lo = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=live.device)  # torch.tensor: a host copy
    return torch.where(allowed, fill, lo)[:, None]


def sdpa_reference(q, k, v, live, log_m, scaling, q_len=None):
    """The reference the other kernels are checked against: SDPA with the dense additive bias, in
    the inputs' dtype, kv heads repeated for GQA; q [B, H, Lq, d] -> [B, Lq, H, d]."""
    rep = q.shape[1] // k.shape[1]
    bias = dense_bias(live, log_m, q.dtype, q_len)
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bias, scale=scaling
    )
    return out.transpose(1, 2)


@dataclass
class KeyMask:
    """What one group of layers' attention may see: built once per group, shared by its layers."""

    live: torch.Tensor  # [B, Lk] bool: real, unpruned keys
    log_m: torch.Tensor | None  # [B, Lk] log of the soft mask (0 on text), None = unmasked
    dtype: torch.dtype  # dtype of the dense bias (the hidden states')
    q_len: int  # queries are the last q_len key positions (Lk at prefill)
    kernel: str  # resolved: sdpa | flash | flex | channel
    dense: torch.Tensor | None = None  # sdpa only
    block_mask: object | None = None  # flex only
    log_m_pad: torch.Tensor | None = None  # flex only, [B, Lk padded]
    key_bias: torch.Tensor | None = None  # channel only, [B, Lk]

    @classmethod
    def build(cls, live, log_m, dtype, requested="sdpa", training=False, q_len=None):
        # Everything a kernel needs is built here, outside the layers, so activation checkpointing
        # recomputes the same ops and the layers share one bias / block mask.
        q_len = live.shape[1] if q_len is None else q_len
        kernel = select_kernel(requested, live.device, dtype, log_m is not None, training)
        km = cls(live=live, log_m=log_m, dtype=dtype, q_len=q_len, kernel=kernel)
        if kernel == "sdpa":
            km.dense = dense_bias(live, log_m, dtype, q_len)
        elif kernel == "flex":
            km.block_mask, km.log_m_pad = flex_prepare(live, log_m, q_len)
        elif kernel == "channel":
            km.key_bias = channel_key_bias(live, log_m)
        return km

    @property
    def q_offset(self) -> int:
        return self.live.shape[1] - self.q_len

    def score_bias(self, rows):
        """The dense bias of the query rows `rows` [B, Q] -> [B, 1, Q, Lk], for the block-wise scores
        (no gradient): the SDPA path's own bias, else built for those rows alone."""
        if self.dense is not None:
            d = self.dense.detach()
            return d.expand(rows.shape[0], 1, -1, -1).gather(2, rows[:, None, :, None].expand(-1, 1, -1, d.shape[-1]))
        with torch.no_grad():
            log_m = None if self.log_m is None else self.log_m.detach()
            return dense_bias(self.live, log_m, self.dtype, self.q_len, rows)


# -- varlen packing (pure torch) --------------------------------------------------------------
def unpad(x, live):
    """x [B, L, ...] -> (packed [N, ...] of the live rows in order, cu_seqlens [B+1] int32, max_len, indices [N])."""
    lens = live.sum(1, dtype=torch.int32)
    indices = torch.nonzero(live.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, cu, int(lens.max()) if lens.numel() else 0, indices


def repad(packed, indices, batch, length):
    """Inverse of `unpad`: [N, ...] -> [B, L, ...] with zeros in the dead rows."""
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    return out.index_copy(0, indices, packed).view(batch, length, *packed.shape[1:])


# -- flash-attn path (unmasked / hard-pruned) --------------------------------------------------
def flash_attention(q, k, v, live, scaling, dropout=0.0):
    """q [B, H, Lq, d], k/v [B, Hkv, Lk, d] (GQA: flash-attn reads Hkv < H natively); queries are the
    last Lq key positions; returns [B, Lq, H, d]. Dead keys are packed away (varlen)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash layout [B, L, heads, d]
    # causal=True aligns bottom-right (flash-attn >= 2.1): query i sees keys <= Lk - Lq + i
    if bool(live.all()):
        return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=True)
    q_live = live[:, Lk - Lq :]
    qp, cu_q, max_q, idx_q = unpad(q, q_live)
    kp, cu_k, max_k, _ = unpad(k, live)
    vp = unpad(v, live)[0]
    out = flash_attn_varlen_func(
        qp, kp, vp, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True
    )
    return repad(out, idx_q, B, Lq)


# -- FlexAttention path (masked training layers) -----------------------------------------------
def _ceil(n, m=FLEX_BLOCK):
    return -(-n // m) * m


def flex_prepare(live, log_m, q_len, compile_mask=None):
    """Block mask over lengths padded to multiples of 128, and the padded, floored `log m`."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, Lk = live.shape
    Pq, Pk = _ceil(q_len), _ceil(Lk)
    off = Lk - q_len
    live_p = F.pad(live, (0, Pk - Lk), value=False)

    def mask_mod(b, h, qi, ki):
        qpos = qi + off
        # padded query rows attend everything: never an empty row (its backward is NaN-prone)
        return ((ki <= qpos) & live_p[b, ki]) | (ki == qpos) | (qi >= q_len)

    if compile_mask is None:
        compile_mask = live.is_cuda
    block_mask = create_block_mask(mask_mod, B, None, Pq, Pk, device=live.device, _compile=compile_mask)
    log_m_pad = None
    if log_m is not None:
        log_m_pad = F.pad(log_m.float().clamp_min(_LOGM_FLOOR), (0, Pk - Lk))
    return block_mask, log_m_pad


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # automatic dynamic shapes: ragged training lengths (padded to 128) must not exhaust the recompile limit
    return torch.compile(flex_attention)


def flex_masked_attention(q, k, v, block_mask, log_m_pad, scaling, compiled=None):
    """softmax(q k^T * scaling + log m) v under the block mask of `flex_prepare`; returns [B, Lq, H, d].

    The gradient reaches `log_m_pad` (and so m) through score_mod's capture. On CUDA the compiled
    kernel accumulates that gradient with atomics: it is not bit-reproducible run to run.
    Eager (CPU) flex materialises the scores: for tests only.
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    Pq, Pk = block_mask.shape[-2], block_mask.shape[-1]
    q = F.pad(q, (0, 0, 0, Pq - Lq))
    k, v = F.pad(k, (0, 0, 0, Pk - Lk)), F.pad(v, (0, 0, 0, Pk - Lk))
    score_mod = None
    if log_m_pad is not None:

        def score_mod(score, b, h, qi, ki):
            return score + log_m_pad[b, ki]

    if compiled is None:
        compiled = q.is_cuda
    fn = _compiled_flex() if compiled else flex_attention
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=k.shape[1] != H)
    return out[:, :, :Lq].transpose(1, 2)


# -- log m as a q/k channel (masked training layers on any flash kernel) ---------------------------
# A key-wise additive bias b_j is one more q/k channel: with q'_i = [q_i, c] and
# k'_j = [k_j, b_j / (scaling c)], scaling q'.k' = scaling q.k + b_j. Any kernel that takes no bias
# but returns dK (SDPA's flash / efficient backends, flash-attn) then computes the masked attention,
# and the gradient to b is the channel's dK times 1 / (scaling c), summed over heads by autograd:
# no scatter into [Lk] from every (head, query) tile, so no atomics (the low-rank bias of FlashBias,
# arXiv 2505.12044). Dead keys take the floor in b, so only causality is left to the kernel.
def channel_key_bias(live, log_m):
    """[B, Lk] key bias: `log m` on live keys floored at _LOGM_FLOOR (exact zeros and the dtype minimum
    give weight exp(-1e4) == 0, finite), the floor on dead keys. At least fp32: the split needs it."""
    dtype = torch.promote_types(log_m.dtype, torch.float32)
    floor = torch.full((), _LOGM_FLOOR, dtype=dtype, device=live.device)
    return torch.where(live, log_m.to(dtype).clamp_min(_LOGM_FLOOR), floor)


def channel_constant(scaling) -> float:
    """c: a power of two (exact in every float dtype) near 1 / scaling, so the k channel holds about
    b itself: -1e4 stays inside fp16's range."""
    return 2.0 ** round(math.log2(1.0 / scaling))


def channel_qkv(q, k, v, key_bias, scaling, multiple=8):
    """q [B, H, Lq, d], k / v [B, Hkv, Lk, d], key_bias [B, Lk] -> q', k', v' with head dim padded to a
    multiple of 8 (what the flash kernels accept; v too: SDPA's flash backend wants equal head dims).

    fp32 / fp64 take one channel. fp16 / bf16 take two, hi + lo (b - hi rounded again), so b keeps
    ~16 significant bits instead of 8 (bf16 alone would move log m = -8 by up to 0.03); the
    gradient goes through lo only, whose derivative in b is exactly 1."""
    d = q.shape[-1]
    c = channel_constant(scaling)
    x = key_bias / (scaling * c)
    if k.dtype in (torch.float32, torch.float64):
        chans = [x.to(k.dtype)]
    else:
        hi = x.detach().to(k.dtype)
        chans = [hi, (x - hi.to(x.dtype)).to(k.dtype)]
    n = len(chans)
    pad = -(-(d + n) // multiple) * multiple - d - n
    kc = torch.stack(chans, -1)[:, None].expand(-1, k.shape[1], -1, -1)
    k2 = torch.cat([k, kc, k.new_zeros(*k.shape[:-1], pad)], -1)
    q2 = torch.cat([q, q.new_full((*q.shape[:-1], n), c), q.new_zeros(*q.shape[:-1], pad)], -1)
    return q2, k2, F.pad(v, (0, n + pad))


def channel_attention(q, k, v, key_bias, scaling, dropout=0.0):
    """softmax(q k^T * scaling + key_bias) v, causal (queries are the last Lq keys); q [B, H, Lq, d],
    k / v [B, Hkv, Lk, d] (GQA native), key_bias [B, Lk] from `channel_key_bias`; returns [B, Lq, H, d].

    flash-attn when installed (CUDA, fp16 / bf16), else SDPA (on CUDA its flash / efficient backends,
    on CPU its flash kernel). Dead query rows see only floored keys: finite, unused."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    q2, k2, v2 = channel_qkv(q, k, v, key_bias, scaling)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available():
        from flash_attn import flash_attn_func

        q2, k2, v2 = (t.transpose(1, 2) for t in (q2, k2, v2))
        return flash_attn_func(q2, k2, v2, dropout_p=dropout, softmax_scale=scaling, causal=True)[..., :d]
    mask = None
    if Lq != Lk:  # SDPA's is_causal aligns top-left; queries here are the last keys
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(Lq, Lk)
    out = F.scaled_dot_product_attention(
        q2, k2, v2, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=H != k.shape[1]
    )
    return out[..., :d].transpose(1, 2)
