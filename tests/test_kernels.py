"""Attention kernels (model/kernels.py), CPU part: dispatch, fallbacks, varlen packing, and the flex / flash
wrappers against the SDPA reference. CUDA-only checks are marked `gpu`; the full GPU checks and
benchmarks are `python scripts/gpu_checks.py` (docs/GPU.md)."""

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from model import AtpLlavaConfig
from model import kernels as K
from model.attention import atp_attention

from tiny_models import make_batch, tiny_atp

torch.set_grad_enabled(True)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def fresh_warnings():
    K._warn_once.cache_clear()
    yield


sdpa_ref = K.sdpa_reference


def qkv(B=3, H=4, Hkv=2, Lq=37, Lk=37, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Lq, d, generator=g, dtype=dtype),
        torch.randn(B, Hkv, Lk, d, generator=g, dtype=dtype),
        torch.randn(B, Hkv, Lk, d, generator=g, dtype=dtype),
    )


def left_padded(lens, L):
    return torch.arange(L)[None] >= (L - torch.tensor(lens))[:, None]


# -- dispatch -------------------------------------------------------------------------------------
def expected(requested, device, dtype, masked, flash_ok):
    if requested == "sdpa" or device == "cpu":
        return "sdpa"
    if masked:
        return {"auto": "flex", "flex": "flex", "channel": "channel"}.get(requested, "sdpa")
    if requested == "flex":
        return "flex"
    return "flash" if flash_ok and dtype != torch.float32 else "sdpa"


@pytest.mark.parametrize("flash_ok", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("requested", ["sdpa", "flash", "flex", "channel", "auto"])
def test_select_kernel_table(monkeypatch, requested, device, dtype, masked, training, flash_ok):
    monkeypatch.setattr(K, "flash_available", lambda: flash_ok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = K.select_kernel(requested, device, dtype, masked, training)
    assert got == expected(requested, device, dtype, masked, flash_ok)
    # channel's unmasked layers run flash / SDPA by design, not as a fallback
    fell_back = requested in ("flash", "flex") and got != requested or requested == "channel" and device == "cpu"
    assert bool(caught) == fell_back, [str(w.message) for w in caught]  # explicit requests say so; auto is silent
    if caught:
        assert "SDPA" in str(caught[0].message)


def test_select_kernel_without_flex_falls_back(monkeypatch):
    monkeypatch.setattr(K, "flex_available", lambda training=True: False)
    monkeypatch.setattr(K, "flash_available", lambda: True)
    assert K.select_kernel("auto", "cuda", torch.bfloat16, True, True) == "sdpa"
    assert K.select_kernel("auto", "cuda", torch.bfloat16, False, True) == "flash"
    with pytest.raises(ValueError, match="attn_kernel='bogus'"):
        K.select_kernel("bogus", "cpu", torch.float32, False, False)


def test_requested_kernel_is_checked_at_construction(monkeypatch):
    monkeypatch.setattr(K, "flash_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install '\.\[gpu\]'"):
        K.check_requested("flash")
    with pytest.raises(ImportError, match="flash-attn"):
        tiny_atp(attn_kernel="flash")
    with pytest.raises(Exception, match="attn_kernel"):  # hub strict-dataclass error wrapping ValueError
        AtpLlavaConfig(text_config=dict(model_type="llama", num_hidden_layers=6), atp_layers=[2], attn_kernel="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match=r"auto.*SDPA"):
        K.check_requested("auto")
    monkeypatch.setattr(K, "flex_available", lambda training=True: False)
    with pytest.raises(ImportError, match="torch >= 2.6"):
        K.check_requested("flex")


# -- masks and packing ---------------------------------------------------------------------------
def test_dense_bias_decode_rows_are_the_prefill_rows():
    live = left_padded([7, 4, 9], 9)
    full = K.dense_bias(live, None, torch.float32)
    assert torch.equal(K.dense_bias(live, None, torch.float32, q_len=3), full[:, :, -3:])
    # dead rows see themselves only: finite softmax
    assert (full[1, 0, 0] == 0).sum() == 1 and full[1, 0, 0, 0] == 0


@pytest.mark.parametrize("layout", ["left", "right", "holes"])
def test_unpad_repad_round_trip_and_cu_seqlens(layout):
    lens = [5, 9, 1, 7]
    L = 9
    live = left_padded(lens, L)
    if layout == "right":
        live = live.flip(1)
    if layout == "holes":  # a pruned cache: padding plus gaps
        live = live.clone()
        live[1, 3] = live[3, 5] = False
    x = torch.randn(4, L, 3, 2)
    packed, cu, max_len, idx = K.unpad(x, live)
    n = live.sum(1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.cumsum(n, 0).tolist()
    assert max_len == int(n.max()) and packed.shape == (int(n.sum()), 3, 2)
    for b in range(4):  # each sequence's live rows, in order, between its cu_seqlens
        assert torch.equal(packed[cu[b] : cu[b + 1]], x[b][live[b]])
    back = K.repad(packed, idx, 4, L)
    assert torch.equal(back[live], x[live]) and (back[~live] == 0).all()


# -- flex: eager on CPU against the SDPA reference ----------------------------------------------
@pytest.mark.parametrize("q_len", [None, 3])
@pytest.mark.parametrize("Lk", [37, 128, 130])
def test_flex_forward_and_mask_gradient_match_sdpa(q_len, Lk):
    Lq = Lk if q_len is None else q_len
    q, k, v = qkv(Lq=Lq, Lk=Lk)
    live = left_padded([Lk, Lk - 6, Lk - 20], Lk)
    live[0, 10:14] = False
    log_m = torch.log(
        torch.rand(3, Lk, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).clamp_min(0.05)
    )
    # CPU flex has no backward for q/k/v (CUDA only: scripts/gpu_checks.py); the captured log m's works
    inputs = [q, k, v, log_m.clone().requires_grad_()]
    block_mask, log_m_pad = K.flex_prepare(live, inputs[3], Lq)
    assert log_m_pad.shape[-1] % 128 == 0 and block_mask.shape[-2:] == (K._ceil(Lq), K._ceil(Lk))
    out = K.flex_masked_attention(*inputs[:3], block_mask, log_m_pad, 0.25)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, log_m)]
    ref = sdpa_ref(*ref_inputs[:3], live, ref_inputs[3], 0.25, q_len)
    rows = live[:, Lk - Lq :]
    assert (out - ref)[rows].abs().max() < 1e-5  # flex's eager scores are fp32
    w = torch.randn_like(ref)
    (out * w)[rows].sum().backward()
    (ref * w)[rows].sum().backward()
    assert (inputs[3].grad - ref_inputs[3].grad).abs().max() <= 1e-5 * max(1.0, ref_inputs[3].grad.abs().max())


def test_flex_without_mask_is_causal_padded_attention():
    q, k, v = qkv(Lk=50, Lq=50, dtype=torch.float32)
    live = left_padded([50, 31, 44], 50)
    block_mask, log_m_pad = K.flex_prepare(live, None, 50)
    assert log_m_pad is None
    out = K.flex_masked_attention(q, k, v, block_mask, None, 0.25)
    assert (out - sdpa_ref(q, k, v, live, None, 0.25))[live].abs().max() < 1e-5


# -- channel: log m as a q/k channel, on SDPA's CPU flash kernel, against the SDPA reference ------
def _soft_case(Lq, Lk, dtype, seed=0):
    """GQA q/k/v, left padding plus a hole, and a log m with text keys (0), soft entries and exact zeros
    (the dtype minimum, as `_key_log_mask` writes them)."""
    q, k, v = qkv(Lq=Lq, Lk=Lk, dtype=torch.float64, seed=seed)
    live = left_padded([Lk, Lk - 6, Lk - 20], Lk)
    live[0, 10:14] = False
    g = torch.Generator().manual_seed(seed + 1)
    log_m = torch.rand(3, Lk, dtype=torch.float64, generator=g).clamp_min(0.02).log()
    log_m[:, :5] = 0.0
    log_m[1, 25:33] = torch.finfo(dtype).min
    return (q, k, v, log_m), live


def _fwd_bwd(fn, tensors, w, rows):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out.double() * w)[rows].sum().backward()
    return out.detach().double(), [t.grad.double() for t in leaves]


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def _channel(live):
    return lambda q, k, v, lm: K.channel_attention(q, k, v, K.channel_key_bias(live, lm), 0.25)


def _reference(live, q_len=None):
    return lambda q, k, v, lm: sdpa_ref(q, k, v, live, lm, 0.25, q_len)


@pytest.mark.parametrize("q_len", [None, 3])
@pytest.mark.parametrize("Lk", [37, 130])
def test_channel_matches_sdpa_fp32_forward_and_every_gradient(q_len, Lk):
    Lq = Lk if q_len is None else q_len
    inputs, live = _soft_case(Lq, Lk, torch.float32)
    rows = live[:, Lk - Lq :]
    w = torch.randn(3, Lq, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_out, ref_g = _fwd_bwd(_reference(live, q_len), inputs, w, rows)  # float64
    out, grads = _fwd_bwd(_channel(live), [t.float() for t in inputs], w, rows)
    assert (out - ref_out)[rows].abs().max() < 1e-5
    for name, got, ref in zip(("q", "k", "v", "log_m"), grads, ref_g):
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max()), name
    # exact zeros and dead keys get no mask gradient, as in the reference
    assert (grads[3][1, 25:33] == 0).all() and (grads[3][~live] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_low_precision_within_the_reference_error(dtype):
    """bf16 / fp16 inputs (log m too, as in a bf16 model): relative L2 error against float64 at most
    the GPU checks' tolerances and within 2x SDPA's own error in that dtype."""
    inputs, live = _soft_case(130, 130, dtype)
    w = torch.randn(3, 130, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_out, ref_g = _fwd_bwd(_reference(live), inputs, w, live)
    low = [t.to(dtype) for t in inputs]
    sd_out, sd_g = _fwd_bwd(_reference(live), low, w, live)
    out, grads = _fwd_bwd(_channel(live), low, w, live)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    err, base = _rel(out[live], ref_out[live]), _rel(sd_out[live], ref_out[live])
    assert err <= 1e-2 and err <= 2 * base + 1e-4, (err, base)
    for name, got, sd, ref in zip(("q", "k", "v", "log_m"), grads, sd_g, ref_g):
        err, base = _rel(got, ref), _rel(sd, ref)
        assert err <= 2e-2 and err <= 2 * base + 1e-4, (name, err, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_hi_lo_split_keeps_the_bias(dtype):
    """c * scaling * (hi + lo) gives back b to ~1e-5 where one low-precision channel is off by ~1e-3;
    the floor stays finite (fp16's range) and exactly zero weight."""
    scaling = 128**-0.5
    live = torch.ones(1, 200, dtype=torch.bool)
    live[0, -1] = False
    log_m = torch.linspace(-14, 0, 200)[None]
    log_m[0, 0] = torch.finfo(torch.float32).min
    b = K.channel_key_bias(live, log_m)
    assert b[0, 0] == b[0, -1] == K._LOGM_FLOOR
    q = torch.zeros(1, 1, 1, 128, dtype=dtype)
    k = torch.zeros(1, 1, 200, 128, dtype=dtype)
    q2, k2, v2 = K.channel_qkv(q, k, k, b, scaling)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 136 and torch.isfinite(k2).all()
    got = (q2.float() @ k2.float().transpose(-1, -2))[0, 0, 0] * scaling
    assert (got - b[0]).abs().max() <= 1e-5 * 1e4 and (got - b[0])[1:-1].abs().max() < 1e-4
    one = k2[0, 0, :, 128].float() * K.channel_constant(scaling) * scaling  # hi alone
    assert (one - b[0])[1:-1].abs().max() > 1e-3
    assert torch.exp(got[0] - got[1:-1].max()) == 0


# -- flash: the wrapper's layout and packing against SDPA, with a stand-in flash_attn --------------
def _attn_bshd(q, k, v, scale):
    """flash-attn semantics on [B, L, heads, d]: GQA, causal aligned bottom-right."""
    Lq, Lk = q.shape[1], k.shape[1]
    rep = q.shape[2] // k.shape[2]
    mask = torch.arange(Lk)[None] <= (Lk - Lq + torch.arange(Lq))[:, None]
    q, k, v = (
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(rep, 1),
        v.transpose(1, 2).repeat_interleave(rep, 1),
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and dropout_p == 0.0
        calls.append("dense")
        return _attn_bshd(q, k, v, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and cu_q.dtype == cu_k.dtype == torch.int32
        calls.append("varlen")
        outs = [
            _attn_bshd(
                q[cu_q[i] : cu_q[i + 1]][None],
                k[cu_k[i] : cu_k[i + 1]][None],
                v[cu_k[i] : cu_k[i + 1]][None],
                softmax_scale,
            )[0]
            for i in range(len(cu_q) - 1)
        ]
        return torch.cat(outs)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    K.flash_available.cache_clear()
    yield calls
    K.flash_available.cache_clear()


@pytest.mark.parametrize("case", ["full", "padded", "decode"])
def test_flash_wrapper_matches_sdpa(fake_flash, case):
    Lk = 21
    Lq = 2 if case == "decode" else Lk
    q, k, v = qkv(Lq=Lq, Lk=Lk, dtype=torch.float32)
    live = torch.ones(3, Lk, dtype=torch.bool) if case == "full" else left_padded([21, 15, 9], Lk)
    if case == "decode":
        live[0, 4] = False  # a pruned key inside the cache
    out = K.flash_attention(q, k, v, live, 0.25)
    rows = live[:, Lk - Lq :]
    assert (out - sdpa_ref(q, k, v, live, None, 0.25, Lq))[rows].abs().max() < 1e-5
    assert (out[~rows] == 0).all()
    assert fake_flash == ["dense" if case == "full" else "varlen"]


def test_attention_function_dispatches_on_the_key_mask(fake_flash):
    q, k, v = qkv(Lq=12, Lk=12, dtype=torch.float32)
    live = left_padded([12, 7, 10], 12)
    module = types.SimpleNamespace(training=False, num_key_value_groups=2, is_causal=True)
    outs = {}
    for kernel in ("sdpa", "flash", "flex", "channel"):
        km = K.KeyMask.build(live, None, torch.float32)
        km.kernel = kernel  # as if selected on CUDA
        if kernel == "flex":
            km.block_mask, km.log_m_pad = K.flex_prepare(live, None, 12)
        if kernel == "channel":
            km.key_bias = K.channel_key_bias(live, torch.zeros(3, 12))
        outs[kernel] = atp_attention(module, q, k, v, km.dense, scaling=0.25, atp_keys=km)[0]
    assert fake_flash == ["varlen"]
    for kernel in ("flash", "flex", "channel"):
        assert (outs[kernel] - outs["sdpa"])[live].abs().max() < 1e-5, kernel


# -- the model: kernels are invisible to the decoder loop --------------------------------------------
def _run(m, b, grad=True):
    m.train()
    torch.manual_seed(0)
    with torch.set_grad_enabled(grad):
        out = m(**b)
    grads = None
    if grad:
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.atp_parameters()])
        m.zero_grad()
    m.eval()
    with torch.no_grad():
        ev = m(**b)
    gen = m.generate(
        **{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}, max_new_tokens=3, do_sample=False
    )
    return out.loss.detach(), out.logits.detach(), grads, ev.logits, gen


def test_model_sdpa_and_auto_identical_on_cpu():
    _, a = tiny_atp()
    _, b = tiny_atp(attn_kernel="auto")
    b.load_state_dict(a.state_dict())
    batch = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], seed=1)
    for x, y in zip(_run(a, batch), _run(b, batch)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kernel", ["flex", "flash", "channel"])
def test_model_with_forced_kernel_matches_sdpa(monkeypatch, fake_flash, kernel):
    """The whole loop (soft training, scores, hard prefill, pruned-cache decoding) on the flex / flash /
    channel code paths, forced on CPU (eager flex, stand-in flash, channel on SDPA's CPU flash kernel),
    against the SDPA reference. The soft path's gradient through flex needs CUDA (CPU flex has no q/k/v
    backward): forward only there; flash and channel compare the threshold gradients too."""
    _, m = tiny_atp()
    batch = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], seed=1)
    grad = kernel != "flex"
    ref = _run(m, batch, grad=grad)
    select = K.select_kernel
    calls = []

    def forced(requested, device, dtype, masked, training):
        if kernel in ("flash", "channel") and masked:  # flash never takes the soft mask
            return "sdpa" if kernel == "flash" else "channel"
        return "sdpa" if kernel == "channel" else kernel

    def counted(*a, **kw):
        calls.append(1)
        return channel(*a, **kw)

    channel = K.channel_attention
    monkeypatch.setattr(K, "channel_attention", counted)
    monkeypatch.setattr(K, "select_kernel", forced)
    got = _run(m, batch, grad=grad)
    monkeypatch.setattr(K, "select_kernel", select)
    live = batch["attention_mask"].bool()
    loss, logits, grads, ev, gen = got
    assert torch.allclose(loss, ref[0], atol=1e-5)
    assert (logits - ref[1])[live].abs().max() < 1e-4
    if grad:  # flash: SDPA for the masked layers, flash for the unmasked ones; channel: the masked ones
        assert torch.allclose(grads, ref[2], atol=1e-5, rtol=1e-4)
    text = live & (batch["input_ids"] != 119)
    assert (ev - ref[3])[text].abs().max() < 1e-4
    assert torch.equal(gen, ref[4])
    if kernel == "flash":
        assert "varlen" in fake_flash
    assert bool(calls) == (kernel == "channel")  # the masked layers after the first ATP module


# -- CUDA (skipped here; scripts/gpu_checks.py is the full set) ---------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flex_matches_fp32_reference():
    q, k, v = (t.cuda() for t in qkv(B=2, H=8, Hkv=2, Lq=200, Lk=200, d=64, dtype=torch.float32))
    live = left_padded([200, 150], 200).cuda()
    log_m = torch.rand(2, 200, device="cuda").clamp_min(0.05).log()
    ref = sdpa_ref(q, k, v, live, log_m, 0.125)
    bm, lp = K.flex_prepare(live, log_m, 200)
    out = K.flex_masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bm, lp, 0.125).float()
    assert ((out - ref)[live].norm() / ref[live].norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and K.flash_available()), reason="needs CUDA and flash-attn")
def test_cuda_flash_varlen_matches_fp32_reference():
    q, k, v = (t.cuda() for t in qkv(B=2, H=8, Hkv=2, Lq=200, Lk=200, d=64, dtype=torch.float32))
    live = left_padded([200, 150], 200).cuda()
    ref = sdpa_ref(q, k, v, live, None, 0.125)
    out = K.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), live, 0.125).float()
    assert ((out - ref)[live].norm() / ref[live].norm()) < 1e-2
