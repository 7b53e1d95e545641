"""Benchmark of the hard-pruning path on a random-weight model (`python -m pipeline.eval.bench`).

At batch 1 and batch 8 (left-padded prompts of different text lengths, one image each), in the
padded and the packed layout (`hard_layout`, model/packed.py), interleaved in one process: the
prefill time of the unpruned model, of `fixed` at N_bar = 25% / 15% / 11% of the visual tokens
and of ATP calibrated to N_bar 25% (its counts differ per image); the time per decoded token
(pruned KV cache) unpruned vs N_bar 25%; each time's ratio to the unpruned one of the same layout,
repeat by repeat, beside the analytic FLOPs ratio (METHOD sec 8). Every number is the median of
>= 5 repeats after warm-up, with its [min, max]; a ratio whose spread ((max - min) / median over
the repeats) exceeds 10% is marked `~`. Also the ATP modules' own share of an ATP prefill (scores,
threshold MLP, gather), measured by the model's own `pruning.PruningClock`, and the aten ops and host syncs of one
forward per method and layout (`pipeline/eval/opcount.py`).

`--compile` adds eager vs the decoder layers under `torch.compile(dynamic=True)` (`compile_layers`)
vs the layers and the pruning steps (`compile_pruning`; on CPU inductor needs a C++ compiler):
prefill and decode, packed layout, interleaved, and the host launches of one prefill per mode
(`opcount.count_launches`: the dispatch-level op count above cannot see inside compiled graphs).

`--attn` adds masked attention fwd+bwd on CPU (the soft path's kernels: SDPA with the dense bias,
`log m` as a q/k channel, unmasked causal SDPA), interleaved, medians with their spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration

from model import CACHE_KW, AtpLlavaForConditionalGeneration, kernels, model_costs
from model.budget import counts_for_budget
from model.calibration import calibrate_budget, calibrate_thresholds
from model.pruning import PruningClock

from .opcount import KERNEL_PROFILE, OpCounter, count_launches
from .timing import MIN_REPEATS, fmt_ratio, fmt_time, interleaved, ratio_stats, spread_stats


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


def prompts(args, batch, seed=0):
    """`batch` left-padded prompts, one image each: 8 text tokens, the image, then the rest of the
    text; sample b has args.text - b * args.text / (2 * batch) text tokens (batch 1: args.text)."""
    g = torch.Generator().manual_seed(seed)
    lv = args.grid**2
    rows = []
    for b in range(batch):
        post = args.text - 8 - (b * args.text) // (2 * batch)
        rows.append(
            torch.cat(
                [
                    torch.randint(1, 900, (8,), generator=g),
                    torch.full((lv,), 999),
                    torch.randint(1, 900, (post,), generator=g),
                ]
            )
        )
    pix = torch.randn(batch, 3, args.grid * 4, args.grid * 4, generator=g)
    return left_pad(rows) | {"pixel_values": pix}


def left_pad(rows):
    """input_ids / attention_mask [B, L] of token rows (1-D tensors), right-aligned, on the rows' device."""
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :], mask[b, L - len(r) :] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def text_only(inputs, image_token=999):
    """The same prompts without their image (left-padded again): decoding them is the floor of any
    visual-token pruning, the cost of the weights and the text's KV alone."""
    return left_pad(
        [ids[m.bool() & (ids != image_token)] for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    )


def methods(args, lv):
    """name -> the config fields it sets: unpruned, `fixed` at N_bar 25/15/11%, ATP (calibrated to 25%)."""
    out = {"unpruned": dict(pruning="none")}
    for share in (0.25, 0.15, 0.11):
        counts = counts_for_budget(args.atp_layers, args.layers, lv, share)
        out[f"fixed {share:.0%}"] = dict(pruning="fixed", fixed_counts=counts)
    out["atp 25%"] = dict(pruning="atp")
    return out


def use(m, settings, layout):
    m.config.hard_layout = layout
    for k, v in settings.items():
        setattr(m.config, k, v)


def costs(m, inputs, settings):
    """FLOPs and KV bytes of one prefill of the batch (summed over its samples), and N_bar / Lv."""
    use(m, settings, "padded")
    vt = m(**inputs, logits_to_keep=1).visual_tokens
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != 999)).sum(1).tolist()
    per = [model_costs(vt[b].tolist(), text[b], m.config) for b in range(vt.shape[0])]
    lv = m.config.num_visual_tokens
    return {
        "flops": sum(c["flops_exact"] for c in per),
        "kv": sum(c["kv_cache_bytes"] for c in per),
        "n_bar_share": float(vt.float().mean()) / lv,
        "kept_last": vt[:, -1].tolist(),
    }


def decode_timer(m, inputs, settings, layout, steps):
    """A fn that prefills with a fresh cache (untimed) and returns the time per decoded token."""

    def run():
        use(m, settings, layout)
        cache = DynamicCache(config=m.config.text_config)
        tok = m(**inputs, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            tok = m(input_ids=tok, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / steps

    return run


LAYOUTS = ("padded", "packed")
DECODED = ("unpruned", "fixed 25%", "atp 25%")
TEXT_ONLY = "text only"


def op_counts(m, inputs, meths):
    """Aten ops and host syncs of one forward per method and layout."""
    out = {}
    for layout in LAYOUTS:
        for name, settings in meths.items():
            use(m, settings, layout)
            with OpCounter() as c:
                m(**inputs, logits_to_keep=1)
            out[f"{name} / {layout}"] = c.summary()
    return out


COMPILED = ("unpruned", "atp 25%")
COMPILE_MODES = {"eager": (False, False), "layers": (True, False), "layers+steps": (True, True)}


def compile_mode(m, mode):
    """Set the model's compiled parts: `COMPILE_MODES[mode]` = (decoder layers, pruning steps).
    Compiled with inductor's kernel profiling, so `count_launches` sees the fused CPU kernels."""
    layers, steps = COMPILE_MODES[mode]
    m.compile_layers(layers, options=KERNEL_PROFILE)
    m.compile_pruning(steps, options=KERNEL_PROFILE)


def bench_compiled(m, inputs, meths, args):
    """Eager vs the decoder layers under `torch.compile(dynamic=True)` (`compile_layers`) vs the layers
    and the pruning steps (`compile_pruning`), packed layout, interleaved: prefill and decode per
    token of unpruned and ATP, each compiled time's ratio to the eager one; the first call of each
    compiled mode (the compile itself) timed apart; and the host launches of one prefill per mode
    (`count_launches`: aten ops that are not views, plus fused kernels)."""

    def toggled(fn, mode):
        def run():
            compile_mode(m, mode)
            return fn()

        return run

    pre, dec, launches = {}, {}, {}
    for n in COMPILED:
        for mode in COMPILE_MODES:
            pre[f"{n} / {mode}"] = toggled(
                lambda n=n: (use(m, meths[n], "packed"), m(**inputs, logits_to_keep=1)), mode
            )
            dec[f"{n} / {mode}"] = toggled(decode_timer(m, inputs, meths[n], "packed", args.decode_tokens), mode)
    first = {}
    for name in [k for k in pre if not k.endswith("eager")]:
        t = time.perf_counter()
        pre[name]()
        dec[name]()
        first[name] = time.perf_counter() - t
    for name, fn in pre.items():  # after the first calls: no compiling inside the count
        fn()
        launches[name] = count_launches(fn)
    times, dtimes = interleaved(pre, args.repeats, args.warmup), interleaved(dec, args.repeats, args.warmup)
    compile_mode(m, "eager")
    rows = []
    for n in COMPILED:
        e = f"{n} / eager"
        row = {"method": n, "launches": {}, "prefill": {}, "decode_per_token": {}}
        for mode in COMPILE_MODES:
            k = f"{n} / {mode}"
            row["launches"][mode] = {x: launches[k][x] for x in ("launches", "ops", "views", "kernels")}
            row["prefill"][mode], row["decode_per_token"][mode] = spread_stats(times[k]), spread_stats(dtimes[k])
            if mode != "eager":
                row.setdefault("first_compiled_call_s", {})[mode] = first[k]
                row.setdefault("prefill_ratio", {})[mode] = ratio_stats(times[k], times[e])
                row.setdefault("decode_ratio", {})[mode] = ratio_stats(dtimes[k], dtimes[e])
        rows.append(row)
    for mode in COMPILE_MODES:  # ATP's launches over the unpruned forward's, per mode
        base, atp = (launches[f"{n} / {mode}"]["launches"] for n in COMPILED)
        rows[1]["launches"][mode]["over_unpruned"] = atp / base
    return rows


def bench_batch(m, args, batch, meths, clock):
    inputs = prompts(args, batch)
    cost = {name: costs(m, inputs, s) for name, s in meths.items()}
    shares = []

    def prefill(settings, layout, share=False):
        def run():
            use(m, settings, layout)
            clock.seconds, t = 0.0, time.perf_counter()
            m(**inputs, logits_to_keep=1)
            if share:
                shares.append(clock.seconds / (time.perf_counter() - t))

        return run

    fns = {
        (n, lay): prefill(s, lay, n.startswith("atp") and lay == "packed") for n, s in meths.items() for lay in LAYOUTS
    }
    times = interleaved({f"{n} / {lay}": f for (n, lay), f in fns.items()}, args.repeats, args.warmup)
    dec = {
        f"{n} / {lay}": decode_timer(m, inputs, meths[n], lay, args.decode_tokens) for n in DECODED for lay in LAYOUTS
    }
    for lay in LAYOUTS:  # the floor: no visual token kept at all
        dec[f"{TEXT_ONLY} / {lay}"] = decode_timer(m, text_only(inputs), meths["unpruned"], lay, args.decode_tokens)
    dtimes = interleaved(dec, args.repeats, args.warmup)
    rows = []
    for n in meths:
        row = {
            "method": n,
            "n_bar_share": cost[n]["n_bar_share"],
            "kept_last_layer": cost[n]["kept_last"],
            "flops_ratio": cost[n]["flops"] / cost["unpruned"]["flops"],
            "kv_ratio": cost[n]["kv"] / cost["unpruned"]["kv"],
        }
        for lay in LAYOUTS:
            ts, base = times[f"{n} / {lay}"], times[f"unpruned / {lay}"]
            row[lay] = {"prefill": spread_stats(ts), "ratio": ratio_stats(ts, base)}
            if n in DECODED:
                ds, dbase = dtimes[f"{n} / {lay}"], dtimes[f"unpruned / {lay}"]
                row[lay]["decode_per_token"] = spread_stats(ds)
                row[lay]["decode_ratio"] = ratio_stats(ds, dbase)
        rows.append(row)
    floor = {
        lay: {
            "decode_per_token": spread_stats(dtimes[f"{TEXT_ONLY} / {lay}"]),
            "decode_ratio": ratio_stats(dtimes[f"{TEXT_ONLY} / {lay}"], dtimes[f"unpruned / {lay}"]),
        }
        for lay in LAYOUTS
    }
    pv = {n: ratio_stats(times[f"{n} / packed"], times[f"{n} / padded"]) for n in meths}
    return {
        "batch": batch,
        "rows": rows,
        "decode_floor_text_only": floor,
        "packed_over_padded": pv,
        "atp_share_of_prefill_time": statistics.median(shares) if shares else None,
        "forward_ops_syncs": op_counts(m, inputs, meths),
    }


def print_batch(res, k):
    print(
        f"\nbatch {res['batch']}: prefill ms median [min, max] over repeats; ratio to unpruned of the same layout, "
        "per repeat, median [min, max] (~: spread > 10%); red.: time reduction / FLOPs reduction"
    )
    print(
        f"{'method':<11} {'N_bar':>6} {'FLOPs':>6} | {'padded ms':>22} {'ratio':>23} {'red.':>5} | "
        f"{'packed ms':>22} {'ratio':>23} {'red.':>5}"
    )
    for r in res["rows"]:
        cells = []
        for lay in LAYOUTS:
            c = r[lay]
            red = (
                (1 - c["ratio"]["ratio"]) / max(1 - r["flops_ratio"], 1e-9)
                if r["method"] != "unpruned"
                else float("nan")
            )
            cells.append(f"{fmt_time(c['prefill']):>22} {fmt_ratio(c['ratio']):>23} {red:>5.2f}")
        print(f"{r['method']:<11} {r['n_bar_share']:>6.1%} {r['flops_ratio']:>6.3f} | {cells[0]} | {cells[1]}")
    print(
        "packed / padded prefill, per repeat: "
        + ", ".join(f"{n} {fmt_ratio(v)}" for n, v in res["packed_over_padded"].items())
    )
    print("decode ms per token, median [min, max]; ratio to unpruned of the same layout:")
    for r in res["rows"]:
        if "decode_per_token" in r["packed"]:
            print(
                f"  {r['method']:<11} "
                + " | ".join(
                    f"{lay} {fmt_time(r[lay]['decode_per_token'])} {fmt_ratio(r[lay]['decode_ratio'])}"
                    for lay in LAYOUTS
                )
            )
    floor = res["decode_floor_text_only"]
    print(
        f"  {TEXT_ONLY:<11} "
        + " | ".join(
            f"{lay} {fmt_time(floor[lay]['decode_per_token'])} {fmt_ratio(floor[lay]['decode_ratio'])}"
            for lay in LAYOUTS
        )
        + "  (the prompts without their image: no pruning decodes faster)"
    )
    if res["compiled"]:
        print(
            "compiled (packed): prefill and decode ms per token, median [min, max], ratio to eager; host launches "
            "of one prefill (aten ops that are not views + fused kernels), ATP's over unpruned's"
        )
    for r in res["compiled"] or ():
        for mode in COMPILE_MODES:
            ratios = dratio = ""
            if mode != "eager":
                ratios = f" (ratio {fmt_ratio(r['prefill_ratio'][mode])})"
                ratios += f", first call {r['first_compiled_call_s'][mode]:.1f} s"
                dratio = f" (ratio {fmt_ratio(r['decode_ratio'][mode])})"
            lc = r["launches"][mode]
            over = f", x{lc['over_unpruned']:.2f} unpruned's" if "over_unpruned" in lc else ""
            print(
                f"  {r['method']:<9} {mode:<12} prefill {fmt_time(r['prefill'][mode])}{ratios}; decode "
                f"{fmt_time(r['decode_per_token'][mode])}{dratio}; {lc['launches']} launches "
                f"({lc['ops'] - lc['views']} ops + {lc['kernels']} kernels){over}"
            )
    if res["atp_share_of_prefill_time"] is not None:
        print(f"ATP modules: {res['atp_share_of_prefill_time']:.2%} of an ATP prefill's time (packed)")
    ops = res["forward_ops_syncs"]
    for lay in LAYOUTS:
        base = ops[f"unpruned / {lay}"]
        print(
            f"one forward, {lay}: "
            + ", ".join(
                f"{name.split(' / ')[0]} {c['ops']} ops (x{c['ops'] / base['ops']:.2f}; not views "
                f"{c['compute_ops']}, x{c['compute_ops'] / base['compute_ops']:.2f}) {c['syncs']} syncs"
                for name, c in ops.items()
                if name.endswith(lay)
            )
        )


def parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=10)  # N_bar 11% needs i_0 / N < 0.11
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--grid", type=int, default=24, help="visual tokens = grid^2 (576 as LLaVA-1.5)")
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--atp-layers", type=int, nargs="+", default=[1, 4, 7])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per number (at least 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--attn", action="store_true", help="also time masked attention fwd+bwd (CPU kernels)")
    p.add_argument("--attn-only", action="store_true", help="only the attention timing")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the decoder layers (and the pruning steps) under torch.compile vs eager (packed)",
    )
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats: at least {MIN_REPEATS} (medians of fewer are not published)")
    result = {}
    if args.attn or args.attn_only:
        attn = bench_attention(args.heads, args.hidden // args.heads, args.repeats)
        print(
            f"masked attention fwd+bwd, CPU fp32, {args.heads} heads x {args.hidden // args.heads}: "
            "median ms [min, max] (spread), interleaved"
        )
        for r in attn:
            cells = "  ".join(f"{n} {fmt_time(st)} ({st['spread']:.0%})" for n, st in r["fwd_bwd"].items())
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_over_causal"))
            print(f"  L={r['L']} B={r['B']}: {cells}; {ratios}")
        result["attention_fwd_bwd"] = attn
    if not args.attn_only:
        result.update(bench_model(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


@torch.no_grad()
def calibrate_atp(m, args, settings, layout="padded"):
    """ATP at N_bar 25%: thresholds calibrated on the largest batch's prompts, so each image keeps its own count."""
    use(m, settings, layout)
    m.config.target_tokens = 0.25 * args.grid**2
    calib = prompts(args, max(args.batches))
    calibrate_thresholds(m, **calib)  # each module near its share, then one offset for N_bar itself
    calibrate_budget(m, [calib], iters=10)


@torch.no_grad()
def bench_model(args):
    m = build(args)
    lv = args.grid**2
    meths = methods(args, lv)
    calibrate_atp(m, args, meths["atp 25%"])
    m.pruning_clock = clock = PruningClock()
    try:
        batches = [bench_batch(m, args, b, meths, clock) for b in args.batches]
    finally:
        m.pruning_clock = None
    for res in batches:  # without the clock: a timer inside a compiled layer would break its graph
        res["compiled"] = bench_compiled(m, prompts(args, res["batch"]), meths, args) if args.compile else None
    print(
        f"\n{args.layers} layers x {args.hidden}, {lv} visual + {args.text} text tokens, {args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats after {args.warmup} warm-up, interleaved"
    )
    for res in batches:
        print_batch(res, len(args.atp_layers))
    return {
        "model": {
            k: getattr(args, k)
            for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "grid", "text", "atp_layers", "dtype")
        },
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batches": batches,
    }


if __name__ == "__main__":
    main()
