"""Prefill benchmark of the hard-pruning path on a random-weight model (`python -m pipeline.eval.bench`).

Measures, side by side in one process: unpruned prefill time; prefill time when the ATP layers
keep counts that give N_bar = 25% / 15% / 11% of the visual tokens; the analytic FLOPs ratio
of each (METHOD sec 8); the ATP modules' own share of an ATP prefill (scores, threshold
MLP, gather), timed by wrapping those functions; and the aten ops and host syncs of one forward,
unpruned vs pruned (`pipeline/eval/opcount.py`). Medians of repeats.

`--attn` adds masked attention fwd+bwd on CPU (the soft path's kernels: SDPA with the dense bias,
`log m` as a q/k channel, unmasked causal SDPA), interleaved, medians with their spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from model import AtpLlavaForConditionalGeneration, kernels, model_costs
from model import modeling_atp_llava as modeling
from model.budget import counts_for_budget

from .opcount import OpCounter


def build(args, seed=0):
    torch.manual_seed(seed)
    grid = args.grid
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=grid * 4,
            patch_size=4,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=1000,
            max_position_embeddings=4096,
        ),
        image_token_id=999,
        image_seq_length=grid * grid,
    )
    llava = LlavaForConditionalGeneration(cfg)
    m = AtpLlavaForConditionalGeneration.from_llava(
        llava,
        atp_layers=args.atp_layers,
        spatial_strides=[2, 3, 4, 6],
        pruning="fixed",
        fixed_counts=[1] * len(args.atp_layers),
    )
    return m.to(getattr(torch, args.dtype)).eval()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class _Clock:
    """Accumulates wall time spent in the wrapped ATP functions."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t

        return inner


def op_counts(m, run, fixed_counts):
    """Aten ops and host syncs of one forward: unpruned, `fixed` at the given counts, ATP (hard)."""
    out = {}
    for name, pruning in (("unpruned", "none"), ("fixed", "fixed"), ("atp", "atp")):
        m.config.pruning, m.config.fixed_counts = pruning, fixed_counts
        with torch.no_grad(), OpCounter() as c:
            run()
        out[name] = c.summary()
    return out


def interleaved(fns, repeats, warmup=2):
    """{name: [seconds]}: every repeat runs each fn once, in an order rotated per repeat, so drift
    (other jobs, thermal) spreads over all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def spread_stats(ts):
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "spread": (max(ts) - min(ts)) / med}


def bench_attention(heads, head_dim, repeats, shapes=((640, 1), (2048, 1)), seed=0):
    """Masked attention fwd+bwd on CPU (fp32): the dense-bias reference, the channel kernel, and
    unmasked causal SDPA as the floor. FlexAttention is GPU-only here (eager CPU flex has no q/k/v
    backward): `scripts/gpu_checks.py --parts bench_attn` times it beside these."""
    rows = []
    for L, B in shapes:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, heads, L, head_dim, generator=g).requires_grad_() for _ in range(3))
        live = torch.ones(B, L, dtype=torch.bool)
        log_m = torch.zeros(B, L)
        nv = min(576, L - 64)  # the image's keys carry the soft mask
        log_m[:, 8 : 8 + nv] = torch.rand(B, nv, generator=g).clamp_min(0.02).log()
        log_m.requires_grad_()
        go = torch.randn(B, L, heads, head_dim, generator=g)
        scale = head_dim**-0.5

        def sdpa_bias():
            kernels.sdpa_reference(q, k, v, live, log_m, scale).backward(go)

        def channel():
            kernels.channel_attention(q, k, v, kernels.channel_key_bias(live, log_m), scale).backward(go)

        def sdpa_causal():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(
                1, 2
            ).backward(go)

        times = interleaved({"sdpa_bias": sdpa_bias, "channel": channel, "sdpa_causal": sdpa_causal}, repeats)
        stats = {n: spread_stats(ts) for n, ts in times.items()}
        base = stats["sdpa_causal"]["median_s"]
        rows.append(
            {"L": L, "B": B, "heads": heads, "head_dim": head_dim, "fwd_bwd": stats}
            | {f"{n}_over_causal": st["median_s"] / base for n, st in stats.items() if n != "sdpa_causal"}
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=10)  # N_bar 11% needs i_0 / N < 0.11
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--grid", type=int, default=24, help="visual tokens = grid^2 (576 as LLaVA-1.5)")
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--atp-layers", type=int, nargs="+", default=[1, 4, 7])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--attn", action="store_true", help="also time masked attention fwd+bwd (CPU kernels)")
    p.add_argument("--attn-only", action="store_true", help="only the attention timing")
    args = p.parse_args(argv)
    if args.attn or args.attn_only:
        attn = bench_attention(args.heads, args.hidden // args.heads, max(args.repeats, 5))
        print(
            f"masked attention fwd+bwd, CPU fp32, {args.heads} heads x {args.hidden // args.heads}: "
            "median ms [min, max] (spread), interleaved"
        )
        for r in attn:
            cells = "  ".join(
                f"{n} {st['median_s'] * 1e3:.1f} [{st['min_s'] * 1e3:.1f}, {st['max_s'] * 1e3:.1f}] "
                f"({st['spread']:.0%})"
                for n, st in r["fwd_bwd"].items()
            )
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_over_causal"))
            print(f"  L={r['L']} B={r['B']}: {cells}; {ratios}")
        if args.attn_only:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"attention_fwd_bwd": attn}, f, indent=2)
            return {"attention_fwd_bwd": attn}

    m = build(args)
    lv, n = args.grid**2, args.layers
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(1, 900, (1, 8), generator=g)
    post = torch.randint(1, 900, (1, args.text - 8), generator=g)
    ids = torch.cat([pre, torch.full((1, lv), 999), post], 1)
    pix = torch.randn(1, 3, args.grid * 4, args.grid * 4, generator=g).to(m.dtype)
    run = lambda: m(input_ids=ids, pixel_values=pix, logits_to_keep=1)

    timed(run, 1)  # warm-up
    m.config.pruning = "none"
    t_full, out = timed(run, args.repeats)
    cost_full = model_costs(out.visual_tokens[0].tolist(), args.text, m.config)
    rows = []
    m.config.pruning = "fixed"
    for share in (0.25, 0.15, 0.11):
        m.config.fixed_counts = counts_for_budget(args.atp_layers, n, lv, share)
        t, out = timed(run, args.repeats)
        cost = model_costs(out.visual_tokens[0].tolist(), args.text, m.config)
        rows.append(
            {
                "n_bar_share": round(cost["n_bar"] / lv, 4),
                "kept_counts": m.config.fixed_counts,
                "prefill_s": t,
                "time_ratio": t / t_full,
                "flops_ratio_paper": cost["flops_paper"] / cost_full["flops_paper"],
                "flops_ratio_exact": cost["flops_exact"] / cost_full["flops_exact"],
                "kv_ratio": cost["kv_cache_bytes"] / cost_full["kv_cache_bytes"],
            }
        )

    # the ATP modules' own share of an ATP prefill: score blocks, threshold MLP, gather
    m.config.pruning = "atp"
    clock = _Clock()
    cls = modeling.AtpLlavaForConditionalGeneration
    saved = {name: getattr(cls, name) for name in ("_score_request", "_atp_step", "_gather")}
    import model.attention as attention

    saved_red = attention.redundancy_scores
    try:
        for name, fn in saved.items():
            setattr(cls, name, clock.wrap(fn))
        attention.redundancy_scores = clock.wrap(saved_red)
        shares = []
        for _ in range(args.repeats):
            clock.total = 0.0
            t, out = timed(run, 1)
            shares.append(clock.total / t)
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)
        attention.redundancy_scores = saved_red
    atp_cost = model_costs(out.visual_tokens[0].tolist(), args.text, m.config)
    counts = op_counts(m, run, counts_for_budget(args.atp_layers, n, lv, 0.25))
    result = {
        "model": {
            k: getattr(args, k)
            for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "grid", "text", "atp_layers", "dtype")
        },
        "torch_threads": torch.get_num_threads(),
        "unpruned_prefill_s": t_full,
        "budgets": rows,
        "atp_share_of_prefill_time": statistics.median(shares),
        "atp_share_of_prefill_flops": atp_cost["atp_flops"] / atp_cost["flops_exact"],
        "atp_n_bar_share_at_init": atp_cost["n_bar"] / lv,
        "forward_ops_syncs": counts,  # fixed: at N_bar 25%
    }
    if args.attn:
        result["attention_fwd_bwd"] = attn
    print(
        f"unpruned prefill: {t_full * 1e3:.1f} ms  ({args.layers} layers x {args.hidden}, "
        f"{lv} visual + {args.text} text, {args.dtype})"
    )
    print(f"{'N_bar':>7} {'time':>9} {'time ratio':>11} {'FLOPs ratio':>12} {'KV ratio':>9}  reduction time/FLOPs")
    for r in rows:
        red = (1 - r["time_ratio"]) / max(1 - r["flops_ratio_exact"], 1e-9)
        print(
            f"{r['n_bar_share']:>7.1%} {r['prefill_s'] * 1e3:>7.1f}ms {r['time_ratio']:>11.3f} "
            f"{r['flops_ratio_exact']:>12.3f} {r['kv_ratio']:>9.3f}  {red:.2f}"
        )
    print(
        f"ATP modules: {result['atp_share_of_prefill_time']:.2%} of an ATP prefill's time, "
        f"{result['atp_share_of_prefill_flops']:.2%} of its FLOPs"
    )
    k = len(args.atp_layers)
    base = counts["unpruned"]
    for name, c in counts.items():
        extra = (c["syncs"] - base["syncs"]) / k if name != "unpruned" else 0
        print(
            f"one forward, {name:<8}: {c['ops']:>5} aten ops (x{c['ops'] / base['ops']:.2f}), {c['syncs']} host syncs"
            + (f" ({extra:+.1f} per pruning point)" if name != "unpruned" else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
