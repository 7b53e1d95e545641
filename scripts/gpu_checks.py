"""All GPU checks and benchmarks of the attention kernels in one command (docs/GPU.md):

    python scripts/gpu_checks.py --out DIR [--parts kernels,model,bench_attn,bench_prefill,packed,compiled] [--dry]

- kernels: each GPU kernel (FlexAttention and the channel kernel with the soft mask, flash-attn dense and varlen, a
  decode step over a pruned cache) in bf16 against the float32 SDPA reference: forward output,
  gradients to q, k, v and to the mask's log m; MHA and GQA; a length that is not a multiple of
  128; FlexAttention's run-to-run spread of the mask gradient (atomics).
- model: a LLaVA-shaped model with random weights in bf16: hard-path logits with attn_kernel
  "auto" / "channel" (flash-attn varlen) vs the padded SDPA path, and the soft path's loss and
  threshold gradients (FlexAttention / the channel kernel) vs SDPA, all against an fp32 SDPA run.
- bench_attn: masked fwd+bwd (FlexAttention, log m in score_mod; the channel kernel, log m as a
  q/k channel) vs flash-attn fwd+bwd vs SDPA with a dense bias, side by side, at L = 640 and 2048
  (goal: masked <= 1.5x the unmasked flash kernel).
- bench_prefill: hard-path prefill of a LLaVA-7B-shaped Llama (random weights, bf16) at
  N_bar = 25% vs unpruned, per kernel, against the FLOPs ratio.
- packed: the packed hard path (`hard_layout: packed`, model/packed.py: varlen attention, per-sample
  KV segments) vs the padded one: hard logits of a ragged batch in bf16, each against an fp32 padded
  run (packed within MODEL_SLACK of padded's error); on the 7B-shaped model at batch 1 and 8,
  prefill and per-token decode time, unpruned vs N_bar 25%, per layout; the aten ops and host syncs
  of one forward (pipeline/eval/opcount.py) per layout.
- compiled: eager vs the decoder layers under torch.compile(dynamic=True) (`compile_layers`) vs the
  layers and the pruning steps (`compile_pruning`) on the packed path, 7B-shaped model, batch 1 and 8:
  logits compiled vs eager, the compile's own time, prefill and decode per token, unpruned vs
  N_bar 25%, the modes interleaved; the host launches and GPU kernels of one prefill per mode.
- profile_prefill (by name only): torch.profiler over the batch-1 prefill, unpruned and pruned:
  the top ops by host and by GPU time (batch 1 is launch-bound).

Writes DIR/gpu_checks.json and prints tables. Exit status 1 if a correctness check fails, 2 without
CUDA. Needs only the model/ package and pipeline/eval/ (opcount.py, bench.py; no tests). `--dry` runs the parts on
this machine's CPU, fp32, on small shapes: the plumbing only, no number from it means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration, model_costs  # noqa: E402
from model import kernels as K  # noqa: E402
from model.budget import keep_share_per_module  # noqa: E402
from pipeline.eval.bench import text_only as bench_text_only  # noqa: E402

# bf16 tolerances, relative L2 error ||x - ref|| / ||ref|| over live rows, ref = fp32 SDPA
TOL_OUT = 1e-2  # kernel outputs
TOL_GRAD = 2e-2  # kernel gradients (q, k, v, log m)
MODEL_SLACK = 1.5  # model level: the kernel's error may be at most 1.5x bf16 SDPA's error (+ 1e-3)
DEV = "cuda"  # module globals, so the plumbing can be dry-run elsewhere on small shapes with stand-in kernels
ATTN_SHAPES = ((640, 16), (2048, 4))  # (L, batch) of the attention benchmark: 32 heads x 128
PREFILL_MODEL = dict(
    layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, atp_layers=[4, 14, 24]
)  # LLaVA-7B's Llama
SMALL = dict(layers=10, hidden=64, ffn=128, heads=4, kv_heads=2, atp_layers=[1, 4, 7])  # --dry
DRY = False  # --dry: CPU, fp32, SMALL shapes, few iterations
LOW = torch.bfloat16  # the low precision under test (fp32 under --dry: CPU bf16 is emulated)
ITERS = 20


def rel(x, ref, rows=None):
    x, ref = x.float(), ref.float()
    if rows is not None:
        x, ref = x[rows], ref[rows]
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def left_padded(lens, L):
    return torch.arange(L, device=DEV)[None] >= (L - torch.tensor(lens, device=DEV))[:, None]


sdpa_ref = K.sdpa_reference


def fwd_bwd(fn, tensors, w, rows):
    """Output and gradients of sum(out * w) over live rows, for fresh leaves of `tensors`."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out.float() * w)[rows].sum().backward()
    return out.detach(), [t.grad for t in leaves]


# -- kernels --------------------------------------------------------------------------------------
def check_kernels(have_flash):
    results = []
    scale = 128**-0.5
    for name, H, Hkv, L in (("mha_L640", 32, 32, 640), ("gqa_L601", 32, 8, 601)):
        g = torch.Generator(device=DEV).manual_seed(0)
        B, d = 2, 128
        q = torch.randn(B, H, L, d, device=DEV, generator=g)
        k = torch.randn(B, Hkv, L, d, device=DEV, generator=g)
        v = torch.randn(B, Hkv, L, d, device=DEV, generator=g)
        live = left_padded([L, L - 77], L)
        log_m = torch.rand(B, L, device=DEV, generator=g).clamp_min(0.02).log()
        log_m[:, :40] = 0.0  # text keys: m = 1
        w = torch.randn(B, L, H, d, device=DEV, generator=g)
        f32 = (q, k, v, log_m)
        bf = tuple(t.bfloat16() for t in (q, k, v)) + (log_m,)

        def masked_sdpa(q, k, v, lm):
            return sdpa_ref(q, k, v, live, lm, scale)

        def masked_flex(q, k, v, lm):
            bm, lp = K.flex_prepare(live, lm, L)
            return K.flex_masked_attention(q, k, v, bm, lp, scale)

        def masked_channel(q, k, v, lm):
            return K.channel_attention(q, k, v, K.channel_key_bias(live, lm), scale)

        ref_out, ref_g = fwd_bwd(masked_sdpa, f32, w, live)
        cases = {"sdpa_bf16": masked_sdpa, "flex": masked_flex, "channel": masked_channel}
        for case, fn in cases.items():
            out, grads = fwd_bwd(fn, bf, w, live)
            r = {"check": f"masked/{name}/{case}", "out": rel(out, ref_out, live)}
            r.update({f"d{n}": rel(a, b) for n, a, b in zip(("q", "k", "v", "log_m"), grads, ref_g)})
            r["finite"] = all(bool(torch.isfinite(t).all()) for t in [out, *grads])
            if case != "sdpa_bf16":
                _, again = fwd_bwd(fn, bf, w, live)
                # flex: atomics; channel: expected 0 (but flash backward kernels may split over queries)
                r["dlog_m_rerun_max_abs_diff"] = float((again[3] - grads[3]).abs().max())
                r["pass"] = (
                    r["finite"]
                    and r["out"] <= TOL_OUT
                    and all(r[f"d{n}"] <= TOL_GRAD for n in "qkv")
                    and r["dlog_m"] <= TOL_GRAD
                )
            results.append(r)

        if not have_flash:
            continue
        for layout, lv in (("dense", torch.ones_like(live)), ("varlen", live)):
            ref_out, ref_g = fwd_bwd(lambda q, k, v: sdpa_ref(q, k, v, lv, None, scale), f32[:3], w, lv)
            out, grads = fwd_bwd(lambda q, k, v: K.flash_attention(q, k, v, lv, scale), bf[:3], w, lv)
            r = {"check": f"flash_{layout}/{name}", "out": rel(out, ref_out, lv)}
            r.update({f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, ref_g)})
            r["pass"] = r["out"] <= TOL_OUT and all(r[f"d{n}"] <= TOL_GRAD for n in "qkv")
            results.append(r)
        # a decode step: 3 new queries over a pruned cache (left padding plus gaps)
        dl = live.clone()
        dl[0, 100:300] = False
        qd = q[:, :, -3:]
        ref_out = sdpa_ref(qd, k, v, dl, None, scale, q_len=3)
        out = K.flash_attention(qd.bfloat16(), k.bfloat16(), v.bfloat16(), dl, scale)
        r = {"check": f"flash_decode/{name}", "out": rel(out, ref_out)}
        r["pass"] = r["out"] <= TOL_OUT
        results.append(r)
    return results


# -- model level ----------------------------------------------------------------------------------
def llava_config(layers, hidden, ffn, heads, kv_heads, atp_layers, vocab=32064, **fields):
    grid = 24  # 576 visual tokens, as LLaVA-1.5; a 1-layer toy vision tower keeps the time in the LLM
    return AtpLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=grid * 14,
            patch_size=14,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=4096,
        ),
        image_token_id=vocab - 1,
        image_seq_length=grid * grid,
        atp_layers=atp_layers,
        **fields,
    )


def build(cfg, seed=0):
    torch.manual_seed(seed)
    with torch.device(DEV):
        return AtpLlavaForConditionalGeneration(cfg).eval()


def batch(cfg, text_lens, seed=0, answer=4):
    """Left-padded samples: 5 text tokens, the image, the rest text; last `answer` tokens supervised."""
    g = torch.Generator().manual_seed(seed)
    lv, img = cfg.num_visual_tokens, cfg.image_token_id
    rows = [
        torch.cat(
            [
                torch.randint(1, 1000, (5,), generator=g),
                torch.full((lv,), img),
                torch.randint(1, 1000, (t - 5,), generator=g),
            ]
        )
        for t in text_lens
    ]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :], mask[b, L - len(r) :] = r, 1
    labels = torch.where(mask.bool() & (torch.arange(L) >= L - answer), ids, -100)
    pix = torch.randn(len(rows), 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {k: v.to(DEV) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pix).items()}


def check_model(have_flash):
    cfg = llava_config(layers=8, hidden=1024, ffn=2816, heads=16, kv_heads=4, atp_layers=[2, 4, 6], vocab=4096)
    m32 = build(cfg)
    b = batch(cfg, [64, 40, 23])
    lv = cfg.num_visual_tokens
    g = torch.Generator().manual_seed(1)
    # nested random keeps with a different density per sample: different kept counts, ragged lengths
    masks = [(torch.rand(3, lv, generator=g) < torch.tensor([[0.7], [0.4], [0.2]])).float().to(DEV) for _ in range(3)]
    text = b["attention_mask"].bool() & (b["input_ids"] != cfg.image_token_id)
    calls = {"flash": 0, "flex": 0, "channel": 0}
    orig = {"flash": K.flash_attention, "flex": K.flex_masked_attention, "channel": K.channel_attention}

    def counted(name):
        def fn(*a, **kw):
            calls[name] += 1
            return orig[name](*a, **kw)

        return fn

    K.flash_attention, K.flex_masked_attention = counted("flash"), counted("flex")
    K.channel_attention = counted("channel")
    try:
        runs, tag_calls = {}, {}
        for tag, dtype, kernel in (
            ("fp32_sdpa", torch.float32, "sdpa"),
            ("bf16_sdpa", torch.bfloat16, "sdpa"),
            ("bf16_auto", torch.bfloat16, "auto"),
            ("bf16_channel", torch.bfloat16, "channel"),
        ):
            before = dict(calls)
            m = m32.to(dtype)
            m.config.attn_kernel = kernel
            with torch.no_grad():
                hard = m.eval()(**b, atp_masks=masks).logits.float()
            m.train()
            out = m(**b)  # the learned soft masks: gradient through log m to the thresholds
            out.loss.backward()
            grads = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in m.atp_parameters()]
            )
            m.zero_grad(set_to_none=True)
            runs[tag] = (hard, out.loss.detach().float(), grads)
            tag_calls[tag] = {name: calls[name] - before[name] for name in calls}
            m.eval()
    finally:
        K.flash_attention, K.flex_masked_attention = orig["flash"], orig["flex"]
        K.channel_attention = orig["channel"]
        m32.to(torch.float32)
    ref = runs["fp32_sdpa"]
    err = {
        tag: {
            "hard_logits": rel(r[0], ref[0], text),
            "soft_loss": rel(r[1], ref[1]),
            "threshold_grads": rel(r[2], ref[2]),
        }
        for tag, r in runs.items()
        if tag != "fp32_sdpa"
    }
    base = err["bf16_sdpa"]
    rows = []
    for tag, masked in (("bf16_auto", "flex"), ("bf16_channel", "channel")):
        got, n = err[tag], tag_calls[tag]
        ok = all(got[key] <= MODEL_SLACK * base[key] + 1e-3 for key in got)
        agree = float((runs[tag][0].argmax(-1) == runs["bf16_sdpa"][0].argmax(-1))[text].float().mean())
        rows.append(
            {
                "check": f"model/{tag.split('_')[1]}_vs_sdpa_bf16",
                "err_vs_fp32": {k: err[k] for k in ("bf16_sdpa", tag)},
                "top1_agreement_hard": agree,
                "kernel_calls": n,
                "used_flash": n["flash"] > 0 or not have_flash,
                f"used_{masked}": n[masked] > 0,
                "pass": ok and n[masked] > 0 and (n["flash"] > 0 or not have_flash),
            }
        )
    return rows


# -- benchmarks -----------------------------------------------------------------------------------
def cuda_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    if DEV != "cuda":  # --dry: wall time
        return statistics.median([_wall_ms(fn) for _ in range(iters)])
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _wall_ms(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_attn(have_flash):
    rows = []
    H, d, scale = 32, 128, 128**-0.5
    for L, B in ATTN_SHAPES:
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (
            torch.randn(B, H, L, d, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)
        )
        live = torch.ones(B, L, dtype=torch.bool, device=DEV)
        log_m = torch.zeros(B, L, device=DEV)
        nv = min(576, L - 64)  # the image's keys carry the soft mask
        log_m[:, 8 : 8 + nv] = torch.rand(B, nv, device=DEV, generator=g).clamp_min(0.02).log()
        log_m.requires_grad_()
        go = torch.randn(B, L, H, d, device=DEV, dtype=torch.bfloat16, generator=g)
        bm, _ = K.flex_prepare(live, None, L)
        pad = bm.shape[-1] - L

        def flex_masked():
            lp = F.pad(log_m.clamp_min(-1e4), (0, pad))
            K.flex_masked_attention(q, k, v, bm, lp, scale).backward(go)

        def flex_causal():
            K.flex_masked_attention(q, k, v, bm, None, scale).backward(go)

        def channel_masked():  # log m as a q/k channel, SDPA's (or flash-attn's) causal kernel
            K.channel_attention(q, k, v, K.channel_key_bias(live, log_m), scale).backward(go)

        def channel_masked_sdpa_flash():  # the same, SDPA restricted to its flash backend
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                K.channel_attention(q, k, v, K.channel_key_bias(live, log_m), scale).backward(go)

        def sdpa_bias():
            bias = K.dense_bias(live, log_m, torch.bfloat16)
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2).backward(go)

        def sdpa_causal():  # torch's own flash backend: the baseline when flash-attn is absent
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).backward(go)

        fns = {
            "flex_masked": flex_masked,
            "flex_causal": flex_causal,
            "channel_masked": channel_masked,
            "channel_masked_sdpa_flash": channel_masked_sdpa_flash,
            "sdpa_bias": sdpa_bias,
            "sdpa_causal": sdpa_causal,
        }
        if have_flash:
            fns["flash"] = lambda: K.flash_attention(q, k, v, live, scale).backward(go)
        ms, errors = {}, {}
        for name, fn in fns.items():
            try:
                ms[name] = cuda_ms(fn)
            except RuntimeError as e:  # e.g. SDPA's flash backend refusing the padded head dim
                errors[name] = str(e).splitlines()[0][:200]
            q.grad = k.grad = v.grad = log_m.grad = None
        base = ms.get("flash", ms["sdpa_causal"])
        rows.append(
            {
                "L": L,
                "B": B,
                "heads": H,
                "head_dim": d,
                "fwd_bwd_ms": ms,
                "errors": errors,
                "flex_masked_over_flash": ms["flex_masked"] / base,
                "channel_masked_over_flash": ms.get("channel_masked", float("nan")) / base,
                "baseline": "flash" if have_flash else "sdpa_causal",
                "goal_met": ms["flex_masked"] / base <= 1.5,
                "goal_met_channel": ms.get("channel_masked", float("inf")) / base <= 1.5,
            }
        )
    return rows


def prefill_model():
    """The LLaVA-7B-shaped model of the prefill parts (bf16) and its kept counts at N_bar 25%."""
    atp_layers = (SMALL if DRY else PREFILL_MODEL)["atp_layers"]
    shape = SMALL if DRY else PREFILL_MODEL
    cfg = llava_config(**shape, pruning="fixed", fixed_counts=[1] * len(atp_layers), vocab=1024 if DRY else 32064)
    lv = cfg.num_visual_tokens
    q = keep_share_per_module(atp_layers, shape["layers"], lv, 0.25 * lv)
    return build(cfg).to(LOW), [max(1, round(lv * q ** (k + 1))) for k in range(len(atp_layers))]


def bench_prefill(have_flash, batch_sizes=(1, 8)):
    m, counts = prefill_model()
    cfg, lv, text = m.config, m.config.num_visual_tokens, 64
    kernels = ["sdpa", "auto"] if have_flash else ["sdpa"]
    rows = []
    for B in batch_sizes:
        b = batch(cfg, [text] * B)
        b.pop("labels")
        run = lambda: m(**b, logits_to_keep=1)  # noqa: E731, F821 (m is deleted after its last use)
        for kernel in kernels:
            m.config.attn_kernel = kernel
            res = {}
            for budget, pruning in (("unpruned", "none"), ("nbar25", "fixed")):
                m.config.pruning, m.config.fixed_counts = pruning, counts
                with torch.no_grad():
                    ms = cuda_ms(run, iters=20, warmup=20)  # B = 1 is launch-bound: short warm-ups scatter it
                    out = run()
                res[budget] = (ms, model_costs(out.visual_tokens[0].tolist(), text, m.config))
            (t0, c0), (t1, c1) = res["unpruned"], res["nbar25"]
            rows.append(
                {
                    "batch": B,
                    "kernel": kernel,
                    "kept_counts": counts,
                    "n_bar_share": c1["n_bar"] / lv,
                    "unpruned_ms": t0,
                    "nbar25_ms": t1,
                    "time_ratio": t1 / t0,
                    "flops_ratio_exact": c1["flops_exact"] / c0["flops_exact"],
                    "flops_ratio_paper": c1["flops_paper"] / c0["flops_paper"],
                }
            )
    del m
    torch.cuda.empty_cache()
    return rows


def packed_path(have_flash, batch_sizes=(1, 8), decode_tokens=8):
    from transformers import DynamicCache

    from model import CACHE_KW
    from pipeline.eval.opcount import OpCounter

    rows = []
    # correctness: a ragged batch (different text lengths, different kept counts per sample)
    cfg = llava_config(layers=8, hidden=1024, ffn=2816, heads=16, kv_heads=4, atp_layers=[2, 4, 6], vocab=4096)
    if DRY:
        cfg = llava_config(**SMALL, vocab=1024)
    m = build(cfg)
    b = batch(cfg, [64, 40, 23])
    b.pop("labels")
    lv = cfg.num_visual_tokens
    g = torch.Generator().manual_seed(1)
    masks = [(torch.rand(3, lv, generator=g) < torch.tensor([[0.7], [0.4], [0.2]])).float().to(DEV) for _ in range(3)]
    text = b["attention_mask"].bool()
    logits = {}
    for tag, dtype, layout in (
        ("fp32_padded", torch.float32, "padded"),
        ("low_padded", LOW, "padded"),
        ("low_packed", LOW, "packed"),
    ):
        m.to(dtype).config.hard_layout = layout
        with torch.no_grad():
            logits[tag] = m(**b, atp_masks=masks).logits.float()
    m.to(torch.float32)
    e_pad, e_pack = (rel(logits[t], logits["fp32_padded"], text) for t in ("low_padded", "low_packed"))
    rows.append(
        {
            "check": "packed/logits_vs_padded",
            "err_vs_fp32": {"padded": e_pad, "packed": e_pack},
            "pass": e_pack <= MODEL_SLACK * e_pad + 1e-3,
        }
    )
    del m
    # speed: the 7B-shaped model (DRY: small), batch 1 and 8, prefill and decode per token, per layout
    m, counts = prefill_model()
    text_len = 64
    for B in batch_sizes:
        b = batch(m.config, [text_len - (i * text_len) // (2 * B) for i in range(B)])
        b.pop("labels")
        res = {"check": "packed/speed", "batch": B, "kept_counts": counts}
        # the floor of any visual pruning: the same prompts without their image, unpruned
        text_only = bench_text_only(b, image_token=m.config.image_token_id)
        for layout in ("padded", "packed"):
            for budget, pruning in (("unpruned", "none"), ("nbar25", "fixed"), ("text_only", "none")):
                m.config.pruning, m.config.fixed_counts, m.config.hard_layout = pruning, counts, layout
                inputs = text_only if budget == "text_only" else b

                def prefill(decode=0, inputs=inputs):
                    cache = DynamicCache(config=m.config.text_config)  # noqa: F821 (m is deleted after its last use)
                    out = m(**inputs, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)  # noqa: F821
                    tok = out.logits[:, -1:].argmax(-1)
                    for _ in range(decode):
                        tok = m(input_ids=tok, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)  # noqa: F821

                with torch.no_grad():
                    t_pre = cuda_ms(prefill, iters=ITERS, warmup=ITERS)
                    t_all = cuda_ms(lambda: prefill(decode_tokens), iters=ITERS, warmup=2)
                    with OpCounter(sites=False) as c:
                        prefill()
                res[f"{layout}/{budget}"] = {
                    "prefill_ms": t_pre,
                    "decode_ms_per_token": (t_all - t_pre) / decode_tokens,
                    "ops": c.ops,
                    "compute_ops": c.compute_ops,
                    "syncs": c.syncs,
                }
        for layout in ("padded", "packed"):
            u, p = res[f"{layout}/unpruned"], res[f"{layout}/nbar25"]
            res[f"{layout}/prefill_ratio"] = p["prefill_ms"] / u["prefill_ms"]
            res[f"{layout}/decode_ratio"] = p["decode_ms_per_token"] / u["decode_ms_per_token"]
            res[f"{layout}/decode_floor_ratio"] = (
                res[f"{layout}/text_only"]["decode_ms_per_token"] / u["decode_ms_per_token"]
            )
            res[f"{layout}/ops_ratio"] = p["ops"] / u["ops"]
        rows.append(res)
    del m
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return rows


def compiled_path(have_flash, batch_sizes=(1, 8), decode_tokens=8):
    """Eager vs the decoder layers under torch.compile(dynamic=True) (`compile_layers`) vs the layers
    and the pruning steps (`compile_pruning`) on the packed path: the logits (compiled vs eager, both
    in LOW), the first call of each compiled mode (the compile), prefill and decode per token,
    unpruned vs N_bar 25%, the modes interleaved, and the launches of one prefill per mode
    (`opcount.count_launches`: host ops and fused kernels, and the kernels the GPU ran)."""
    from transformers import DynamicCache

    from model import CACHE_KW
    from pipeline.eval.bench import COMPILE_MODES, compile_mode
    from pipeline.eval.opcount import count_launches

    m, counts = prefill_model()
    m.config.hard_layout, text_len, rows = "packed", 64, []
    compiled_modes = [mode for mode in COMPILE_MODES if mode != "eager"]
    for B in batch_sizes:
        b = batch(m.config, [text_len - (i * text_len) // (2 * B) for i in range(B)])
        b.pop("labels")
        res = {"check": "compiled/speed", "batch": B, "kept_counts": counts}
        for budget, pruning in (("unpruned", "none"), ("nbar25", "fixed")):
            m.config.pruning, m.config.fixed_counts = pruning, counts

            def prefill(decode=0):
                cache = DynamicCache(config=m.config.text_config)  # noqa: F821 (m is deleted after its last use)
                out = m(**b, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)  # noqa: F821
                tok = out.logits[:, -1:].argmax(-1)
                for _ in range(decode):
                    tok = m(input_ids=tok, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)  # noqa: F821
                return out.logits.float()

            with torch.no_grad():
                compile_mode(m, "eager")
                eager = prefill()
                out, first, launches = {}, {}, {}
                for mode in compiled_modes:
                    compile_mode(m, mode)
                    t = time.perf_counter()
                    out[mode] = prefill(decode_tokens)  # compiles the prefill and decode graphs
                    first[mode] = time.perf_counter() - t
                for mode in COMPILE_MODES:
                    compile_mode(m, mode)
                    prefill()
                    launches[mode] = {k: v for k, v in count_launches(prefill).items() if k != "by_name"}
                times = {}
                for r in range(ITERS):  # interleaved: the modes alternate, the order flips per repeat
                    for mode in list(COMPILE_MODES)[:: -1 if r % 2 else 1]:
                        compile_mode(m, mode)
                        times.setdefault(f"{mode}/prefill", []).append(cuda_ms(prefill, 1, 1))
                        times.setdefault(f"{mode}/all", []).append(cuda_ms(lambda: prefill(decode_tokens), 1, 0))
                compile_mode(m, "eager")
            med = {k: statistics.median(v) for k, v in times.items()}
            res[budget] = {
                "logits_rel_err_compiled_vs_eager": {mode: rel(out[mode][:, -1], eager[:, -1]) for mode in out},
                "first_compiled_call_s": first,
                "launches": launches,
                **{f"{mode}_prefill_ms": med[f"{mode}/prefill"] for mode in COMPILE_MODES},
                **{
                    f"{mode}_decode_ms_per_token": (med[f"{mode}/all"] - med[f"{mode}/prefill"]) / decode_tokens
                    for mode in COMPILE_MODES
                },
                "prefill_ms_minmax": {k: [min(v), max(v)] for k, v in times.items() if k.endswith("prefill")},
            }
            for mode in compiled_modes:
                res[budget][f"prefill_ratio_{mode}_over_eager"] = (
                    res[budget][f"{mode}_prefill_ms"] / res[budget]["eager_prefill_ms"]
                )
        res["launches_nbar25_over_unpruned"] = {
            mode: res["nbar25"]["launches"][mode]["launches"] / res["unpruned"]["launches"][mode]["launches"]
            for mode in COMPILE_MODES
        }
        rows.append(res)
    del m
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_prefill(have_flash, batch_size=1, top=25):
    """Where the hard path's prefill time goes at batch 1 (the bench's odd case: pruned slower than
    unpruned): torch.profiler over a few forwards of each mode, the top ops by self CPU and self
    CUDA time, and the event-timed median with a long warm-up."""
    from torch.profiler import ProfilerActivity, profile

    def gpu_ms(e):  # the name changed across torch versions
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    m, counts = prefill_model()
    b = batch(m.config, [64] * batch_size)
    b.pop("labels")
    rows = []
    for pruning in ("none", "fixed"):
        m.config.pruning, m.config.fixed_counts = pruning, counts
        with torch.no_grad():
            ms = cuda_ms(lambda: m(**b, logits_to_keep=1), iters=20, warmup=20)  # noqa: F821 (deleted after)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    m(**b, logits_to_keep=1)
                torch.cuda.synchronize()
        ka = prof.key_averages()
        table = (
            lambda key: [  # noqa: E731
                {
                    "op": e.key,
                    "count": e.count,
                    "self_cpu_ms": e.self_cpu_time_total / 5e3,
                    "self_cuda_ms": gpu_ms(e) / 5e3,
                }
                for e in sorted(ka, key=key, reverse=True)[:top]
            ]
        )
        rows.append(
            {
                "pruning": pruning,
                "batch": batch_size,
                "median_ms": ms,
                "by_cpu": table(lambda e: e.self_cpu_time_total),
                "by_cuda": table(gpu_ms),
            }
        )
        print(f"profile B={batch_size} pruning={pruning}: median {ms:.1f} ms (20 warm-up)")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15))
    del m
    torch.cuda.empty_cache()
    return rows


# -- report ---------------------------------------------------------------------------------------
def print_tables(res):
    for r in res.get("kernels", []):
        cols = " ".join(
            f"{k}={v:.2e}" for k, v in r.items() if k not in ("check", "pass", "finite") and isinstance(v, float)
        )
        print(f"{'PASS' if r.get('pass', True) else 'FAIL'} {r['check']:<28} {cols}")
    for r in res.get("model", []):
        print(
            f"{'PASS' if r['pass'] else 'FAIL'} {r['check']}  err vs fp32 {json.dumps(r['err_vs_fp32'])}  "
            f"top1 {r['top1_agreement_hard']:.3f}  calls {r['kernel_calls']}"
        )
    for r in res.get("bench_attn", []):
        ms = "  ".join(f"{k} {v:.2f}" for k, v in r["fwd_bwd_ms"].items())
        print(
            f"attn fwd+bwd L={r['L']} B={r['B']}: {ms} ms; flex_masked / {r['baseline']} = "
            f"{r['flex_masked_over_flash']:.2f}, channel_masked / {r['baseline']} = "
            f"{r['channel_masked_over_flash']:.2f} (goal <= 1.5)" + (f"  errors: {r['errors']}" if r["errors"] else "")
        )
    for r in res.get("packed", []):
        if r["check"] == "packed/logits_vs_padded":
            print(f"{'PASS' if r['pass'] else 'FAIL'} {r['check']}  err vs fp32 {json.dumps(r['err_vs_fp32'])}")
            continue
        for layout in ("padded", "packed"):
            u, p = r[f"{layout}/unpruned"], r[f"{layout}/nbar25"]
            print(
                f"{layout} B={r['batch']}: prefill {u['prefill_ms']:.1f} -> {p['prefill_ms']:.1f} ms "
                f"(x{r[f'{layout}/prefill_ratio']:.3f}), decode {u['decode_ms_per_token']:.2f} -> "
                f"{p['decode_ms_per_token']:.2f} ms/token (x{r[f'{layout}/decode_ratio']:.3f}), ops {u['ops']} -> "
                f"{p['ops']} (x{r[f'{layout}/ops_ratio']:.2f}), syncs {u['syncs']} -> {p['syncs']}; decode floor "
                f"(text only) x{r[f'{layout}/decode_floor_ratio']:.3f}"
            )
    for r in res.get("compiled", []):
        for budget in ("unpruned", "nbar25"):
            c = r[budget]
            for mode in c["launches"]:
                lc = c["launches"][mode]
                gpu = f", {lc['device_kernels']} GPU kernels" if "device_kernels" in lc else ""
                line = (
                    f"compiled B={r['batch']} {budget} {mode}: prefill {c[f'{mode}_prefill_ms']:.1f} ms, decode "
                    f"{c[f'{mode}_decode_ms_per_token']:.2f} ms/token, {lc['launches']} host launches{gpu}"
                )
                if mode != "eager":
                    err, first = c["logits_rel_err_compiled_vs_eager"][mode], c["first_compiled_call_s"][mode]
                    line += (
                        f"; x{c[f'prefill_ratio_{mode}_over_eager']:.3f} eager's prefill, logits rel err "
                        f"{err:.1e}, first call {first:.1f} s"
                    )
                print(line)
        print(
            f"compiled B={r['batch']}: N_bar 25% launches over unpruned's: "
            + ", ".join(f"{mode} x{v:.2f}" for mode, v in r["launches_nbar25_over_unpruned"].items())
        )
    for r in res.get("bench_prefill", []):
        print(
            f"prefill B={r['batch']} {r['kernel']:<5} unpruned {r['unpruned_ms']:.1f} ms, N_bar {r['n_bar_share']:.1%} "
            f"{r['nbar25_ms']:.1f} ms: time x{r['time_ratio']:.3f} vs FLOPs x{r['flops_ratio_exact']:.3f} "
            f"(paper convention x{r['flops_ratio_paper']:.3f})"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--parts", help="default: kernels,model,bench_attn,bench_prefill,packed,compiled (--dry: packed,compiled)"
    )
    p.add_argument(
        "--dry", action="store_true", help="CPU, fp32, small shapes: check the plumbing (parts: packed,compiled)"
    )
    args = p.parse_args(argv)
    if args.dry:
        global DEV, DRY, LOW, ITERS
        DEV, DRY, LOW, ITERS = "cpu", True, torch.float32, 2
    elif not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here; run this on a GPU machine (docs/GPU.md). Nothing was checked.")
        return 2
    os.makedirs(args.out, exist_ok=True)
    have_flash = K.flash_available()
    res = {
        "env": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "none (--dry)",
            "python": platform.python_version(),
            "flash_attn": None,
            "tolerances": {"out": TOL_OUT, "grad": TOL_GRAD, "model_slack": MODEL_SLACK},
        }
    }
    if have_flash:
        import flash_attn

        res["env"]["flash_attn"] = flash_attn.__version__
    else:
        print(
            "flash-attn not installed (pip install '.[gpu]'): flash checks skipped, "
            "benchmarks use SDPA's own flash backend"
        )
    parts = {
        "kernels": check_kernels,
        "model": check_model,
        "bench_attn": bench_attn,
        "bench_prefill": bench_prefill,
        "profile_prefill": profile_prefill,
        "packed": packed_path,
        "compiled": compiled_path,
    }
    for part in (
        args.parts or ("packed,compiled" if args.dry else "kernels,model,bench_attn,bench_prefill,packed,compiled")
    ).split(","):
        t = time.perf_counter()
        res[part] = parts[part](have_flash)
        res.setdefault("seconds", {})[part] = round(time.perf_counter() - t, 1)
        with open(os.path.join(args.out, "gpu_checks.json"), "w") as f:  # after each part: a timeout keeps the rest
            json.dump(res, f, indent=2)
    print_tables(res)
    failed = [
        r["check"] for part in ("kernels", "model", "packed") for r in res.get(part, []) if not r.get("pass", True)
    ]
    if failed:
        print("FAILED:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
