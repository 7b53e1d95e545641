"""Evaluation on the synthetic benchmark: every method at matched budgets, one report.

    python -m pipeline stage eval [CONFIG] [key=value ...]      # the run's models (stage `eval`)
    python -m pipeline eval --checkpoint DIR --shards DIR --out DIR [--methods ...] [--budgets ...]

For the unpruned model and each method x budget (N_bar = share x Lv, docs/METHOD.md sec 7):
accuracy overall / per family / per question type, retention vs unpruned, achieved N_bar,
visual tokens per decoder layer per family, analytic FLOPs and KV-cache bytes
(model/cost.py), and prefill / per-token decode time measured in this process (median of
repeats) next to the unpruned model's. Methods:
- `atp`, `fixed`: trained models (exported checkpoints; the `variants` stage trains one per budget);
- the training-free policies of model/baselines.py (`POLICIES`: fastv, prumerge, ...), applied
  to the unpruned model.
Writes report.json (one record per method x budget: pipeline/eval/records.py), report.md and PNG plots
(pipeline/eval/report.py).
Scoring is pipeline/eval/answers.py's, shared with the lmms-eval plugin.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from model.baselines import make_policy
from pipeline.core.config import EvalConfig
from pipeline.eval.answers import TokenStats, greedy_answers, is_correct, prompt_for, split_processor
from pipeline.eval.methods import ALL_METHODS, SFT_REFERENCE, TRAINED, UNPRUNED, kind, match_budget, trained_share
from pipeline.eval.records import BatchTiming, Record
from pipeline.eval.report import Result, prior_accuracy, record, write_report
from pipeline.eval.samples import Sample, load_samples, prompt_inputs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ one model, one method


def run_method(model, processor, samples: list[Sample], *, batch_size: int, max_new_tokens: int) -> Result:
    """Greedy answers (hard pruning in eval mode), scored per sample, tokens per family, and where
    the kept tokens sit (`Diagnostics`)."""
    from pipeline.eval.diagnostics import Diagnostics

    by_family = defaultdict(list)
    for i, s in enumerate(samples):
        by_family[s.family].append(i)
    correct = [False] * len(samples)
    stats = {}
    overall = TokenStats()
    prefill = {}
    for family, idx in sorted(by_family.items()):
        st = TokenStats()
        preds = greedy_answers(
            model,
            processor,
            [prompt_for(samples[i].question) for i in idx],
            [samples[i].image for i in idx],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stats=st,
            prefill=(found := {}),
        )
        prefill.update({idx[j]: row for j, row in found.items()})
        for i, p in zip(idx, preds):
            correct[i] = is_correct(p, samples[i].answer)
        stats[family] = st.summary()
        overall.merge(st)
    stats["all"] = overall.summary()
    diag = Diagnostics(model.config.grid_size, model.config.num_visual_tokens)
    for i, s in enumerate(samples):
        diag.add(s.qtype, s.object_map(model.config.grid_size), n_shapes=s.n_shapes, **prefill[i])
    tokenizer, _ = split_processor(processor)
    text_len = statistics.mean(len(tokenizer(prompt_for(s.question))["input_ids"]) for s in samples)
    return Result(correct=correct, tokens=stats, text_len=text_len, diagnostics=diag.summary())


@torch.no_grad()
def time_interleaved(entries, inputs, *, repeats: int, decode_tokens: int, warmup: int = 1) -> list[dict]:
    """entries: [(model, policy or None)], all timed on the same `inputs`, interleaved
    (`pipeline.eval.timing`): each repeat runs every entry's prefill and `decode_tokens` decode steps
    (pruned KV cache) once, in a rotated order. Returns per entry the prefill and per-token decode
    seconds of each repeat (warm-up dropped)."""
    from transformers import DynamicCache

    from model import CACHE_KW
    from pipeline.eval.timing import interleaved

    out = [{"prefill": [], "decode": []} for _ in entries]

    def run(i):
        model, policy = entries[i]

        def fn():
            model.pruning_policy = policy
            try:
                cache = DynamicCache(config=model.config.text_config)
                t0 = time.perf_counter()
                o = model(**inputs, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                tok = o.logits[:, -1:].argmax(-1)
                for _ in range(decode_tokens):
                    tok = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                out[i]["prefill"].append(t1 - t0)
                out[i]["decode"].append((time.perf_counter() - t1) / decode_tokens)
            finally:
                model.pruning_policy = None

        return fn

    interleaved({i: run(i) for i in range(len(entries))}, repeats, warmup)
    return [{k: v[warmup:] for k, v in o.items()} for o in out]


class Evaluator:
    """Runs methods on shared samples and collects records; `reference` is the unpruned one."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        batch_size: int,
        max_new_tokens: int,
        timing_batch: int,
        timing_repeats: int,
        decode_tokens: int,
    ):
        self.samples = samples
        self.kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.timing = dict(repeats=timing_repeats, decode_tokens=decode_tokens)
        self.timing_samples = samples[:timing_batch]
        self.timed: list = []  # (record, model, policy): timed together, interleaved, by `time_all`
        self.records: list[Record] = []
        self.reference: Record | None = None
        self.sft_reference: Record | None = None

    def add(
        self, method: str, budget: float | None, model, processor, describe: dict | None = None, policy=None
    ) -> Record:
        """Evaluate one method (`policy`: the pruning policy set on `model`); its timing waits for
        `time_all`, which times every method added, interleaved (the model is kept until then)."""
        t0 = time.time()
        result = run_method(model, processor, self.samples, **self.kw)
        rec = record(method, budget, result, self.samples, model.config, self.reference, describe)
        self.timed.append((rec, model, policy))
        if self.sft_reference is not None and self.sft_reference.accuracy:
            rec.retention_vs_sft = rec.accuracy / self.sft_reference.accuracy
        rec.eval_seconds = round(time.time() - t0, 1)
        if method == UNPRUNED:
            self.reference = rec
        elif method == SFT_REFERENCE:
            self.sft_reference = rec
        self.records.append(rec)
        log.info(
            "%-10s budget %-5s acc %.3f n_bar %s (%.0f s)",
            method,
            budget,
            rec.accuracy,
            "-" if rec.n_bar is None else f"{rec.n_bar:.1f}",
            rec.eval_seconds,
        )
        return rec

    def time_all(self, processor) -> list[int]:
        """Prefill and decode times of every method added, at batch 1 and at the timing batch, all
        methods interleaved (`pipeline.eval.timing`): medians with [min, max], and ratios to `unpruned`
        as the median of the per-repeat ratios, marked `noisy` when they spread over 10%. Returns the
        batch sizes."""
        from pipeline.eval.timing import ratio_stats, spread_stats

        ref = next((i for i, (rec, _, _) in enumerate(self.timed) if rec.method == UNPRUNED), None)
        batches = sorted({1, len(self.timing_samples)})
        for B in batches:
            inputs = prompt_inputs(self.timed[0][1], processor, self.timing_samples[:B])
            times = time_interleaved([(m, p) for _, m, p in self.timed], inputs, **self.timing)
            for i, (rec, _, _) in enumerate(self.timed):
                t = times[i]
                row = BatchTiming(prefill=spread_stats(t["prefill"]), decode_per_token=spread_stats(t["decode"]))
                if ref is not None:
                    row["prefill_ratio"] = ratio_stats(t["prefill"], times[ref]["prefill"])
                    row["decode_ratio"] = ratio_stats(t["decode"], times[ref]["decode"])
                rec.timing = {**(rec.timing or {}), str(B): row}
                ms = 1e3 * row["prefill"]["median_s"], 1e3 * row["decode_per_token"]["median_s"]
                vs_ref = ref is not None and i != ref  # no flat ratio of unpruned to itself
                ratios = (row["prefill_ratio"]["ratio"], row["decode_ratio"]["ratio"]) if vs_ref else (None, None)
                if B == batches[-1]:  # the flat fields: the timing batch's, and batch 1's
                    rec.prefill_ms, rec.decode_ms_per_token = ms
                    rec.prefill_ms_ratio, rec.decode_ms_per_token_ratio = ratios
                else:  # B == 1
                    rec.prefill_ms_b1, rec.decode_ms_per_token_b1 = ms
                    rec.prefill_ms_ratio_b1, rec.decode_ms_per_token_ratio_b1 = ratios
        return batches


# ------------------------------------------------------------------ models


def load_model(path, pruning: str | None = None, dtype=torch.float32, hard_layout: str | None = None):
    """An exported (or any saved AtpLlava) dir in eval mode, with its processor pair; `pruning` and
    `hard_layout` replace the saved config's when given."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration

    config = AtpLlavaConfig.from_pretrained(path)
    if pruning is not None:
        config.pruning = pruning
    if hard_layout is not None:
        config.hard_layout = hard_layout
    model = AtpLlavaForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, (AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


def overlay_data(model, processor, samples: list[Sample]) -> list[dict]:
    """Kept-token masks after each ATP module (hard path) for a few images: paper Fig. 4."""
    cfg = model.config
    out = []
    with torch.no_grad():
        for s in samples:
            res = model(**prompt_inputs(model, processor, [s]))
            if res.atp_info is None:
                continue
            out.append(
                {
                    "image": s.image,
                    "keep": res.atp_info["keep"][0].float().cpu(),
                    "grid": cfg.grid_size,
                    "title": f"{s.family}: {s.question} ({int(res.visual_tokens[0].mean())} tokens)",
                    "layers": list(cfg.atp_layers),
                }
            )
    return out


def evaluate_checkpoints(models: dict, out: Path, settings: EvalConfig, *, title="", base_bar=None) -> dict:
    """models: UNPRUNED -> dir, optionally SFT_REFERENCE -> dir (the unpruned model after the
    same sft: a second reference), ("atp"|"fixed", budget) -> dir (missing ones are skipped with
    a warning). Policies run on the unpruned model. `settings` (the run config's `eval` section,
    the one home of the defaults): shards, budgets, methods (None: ALL_METHODS), sizes."""
    from tqdm import tqdm

    s = settings
    budgets, methods = s.budgets, ALL_METHODS if s.methods is None else s.methods
    samples = load_samples(s.shards, s.limit)
    ev = Evaluator(
        samples,
        batch_size=s.batch_size,
        max_new_tokens=s.max_new_tokens,
        timing_batch=s.timing_batch,
        timing_repeats=s.timing_repeats,
        decode_tokens=s.decode_tokens,
    )
    load = functools.partial(load_model, hard_layout=s.hard_layout)
    base, proc = load(models[UNPRUNED], pruning="none")
    jobs = [(UNPRUNED, None)] + [(SFT_REFERENCE, None)] * (SFT_REFERENCE in models)
    jobs += [(m, b) for b in budgets for m in methods]
    overlays = []
    with tqdm(total=len(jobs), desc="eval", unit="method") as bar:
        for method, budget in jobs:
            bar.set_postfix_str(f"{method} {'' if budget is None else f'{budget:.0%}'}")
            if method == UNPRUNED:
                ev.add(method, None, base, proc)
            elif kind(method) == "reference":
                if Path(models[method]).exists():
                    model, p = load(models[method], pruning="none")
                    ev.add(method, None, model, p)
                else:
                    log.warning("no %s model (%s): skipped", method, models[method])
            elif kind(method) == "trained":
                path = models.get((method, budget))
                if path is None or not Path(path).exists():
                    log.warning("no %s model for budget %s (%s): skipped", method, budget, path)
                else:
                    model, p = load(path, pruning=method)
                    ev.add(method, budget, model, p, describe=_trained_describe(model.config))
                    if method == "atp" and s.overlay_images and not overlays:
                        overlays = overlay_data(model, p, _overlay_samples(samples, s.overlay_images))
            else:
                base.pruning_policy = policy = make_policy(method, base.config, budget)
                try:
                    ev.add(method, budget, base, proc, describe=policy.describe(), policy=policy)
                finally:
                    base.pruning_policy = None
            bar.update()
    log.info("timing %d methods, interleaved", len(ev.timed))
    timing_batches = ev.time_all(proc)
    cfg = base.config
    meta = {
        "title": title,
        "shards": str(s.shards),
        "samples": len(samples),
        "lv": cfg.num_visual_tokens,
        "num_layers": cfg.text_config.num_hidden_layers,
        "atp_layers": list(cfg.atp_layers),
        "hard_layout": cfg.hard_layout,
        "budgets": list(budgets),
        "methods": list(methods),
        "models": {str(k): str(v) for k, v in models.items()},
        "prior_accuracy": prior_accuracy(samples),
        "device": device_description(),
        "date": time.strftime("%Y-%m-%d"),
        "timing_batch": len(ev.timing_samples),
        "timing_batches": timing_batches,
        "timing_repeats": s.timing_repeats,
        "torch_threads": torch.get_num_threads(),
    }
    return write_report(out, ev.records, meta, overlays, base_bar=base_bar)


def _trained_describe(config) -> dict:
    if config.pruning == "fixed":
        return {
            "name": "fixed",
            "paper": "ATP-LLaVA Table 2 (pre-defined counts)",
            "layers": list(config.atp_layers),
            "counts": list(config.fixed_counts),
            "differs": "ranked by S_redundant, trained with the same SFT recipe",
        }
    return {
        "name": "atp",
        "paper": "ATP-LLaVA (arXiv 2412.00447)",
        "layers": list(config.atp_layers),
        "target_tokens": config.target_tokens,
    }


def _overlay_samples(samples, n):
    """Pairs of a coarse and a fine question on the *same* image (synthetic scenes: the background
    and the counting question), so the overlay shows whether the kept tokens follow the question;
    without scenes, samples alternating between families."""
    import dataclasses

    from shards.synthetic import FAMILY_OF, QUESTIONS

    scenes = [s for s in samples if (s.n_shapes or 0) > 1]
    if scenes:
        picked = []
        for s in scenes[: max(1, n // 2)]:
            for q in ("background", "count_total"):
                picked.append(dataclasses.replace(s, question=QUESTIONS[q], qtype=q, family=FAMILY_OF[q], _maps={}))
        return picked
    fams = defaultdict(list)
    for s in samples:
        fams[s.family].append(s)
    picked = []
    while len(picked) < n and any(fams.values()):
        for f in sorted(fams):
            if fams[f] and len(picked) < n:
                picked.append(fams[f].pop(0))
    return picked


def device_description() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


# ------------------------------------------------------------------ the CLI


def main(argv=None) -> int:
    d = EvalConfig()  # the defaults, as a run config's `eval` section has them
    p = argparse.ArgumentParser(prog="python -m pipeline eval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="exported (or any saved AtpLlava) dir: the unpruned "
        "reference runs it with pruning=none, `atp`/`fixed` with its own pruning",
    )
    p.add_argument("--shards", required=True, help="eval shards (folder or brace pattern)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets))
    p.add_argument(
        "--trained",
        nargs="*",
        default=[],
        metavar="METHOD:BUDGET=DIR",
        help="more trained checkpoints, e.g. atp:0.11=runs/x/variants/atp-11/export",
    )
    p.add_argument(
        "--sft-reference",
        metavar="DIR",
        help=f"the unpruned model after the same sft recipe (a run's variants/{SFT_REFERENCE}/export): "
        "a second reference, `retention_vs_sft` in the report",
    )
    p.add_argument("--limit", type=int, default=d.limit)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--timing-repeats", type=int, default=d.timing_repeats)
    p.add_argument(
        "--hard-layout",
        choices=["padded", "packed"],
        default=d.hard_layout,
        help="the hard path's batch layout of every model (model/packed.py; default: each checkpoint's own)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from model import AtpLlavaConfig

    cfg = AtpLlavaConfig.from_pretrained(a.checkpoint)
    models = {UNPRUNED: a.checkpoint}
    if cfg.pruning in TRAINED:  # the checkpoint itself, at the budget it was trained for
        budget = match_budget(trained_share(cfg), a.budgets)
        if budget is None:
            log.warning("%s (%s) matches none of the budgets %s: not filed", a.checkpoint, cfg.pruning, a.budgets)
        else:
            models[(cfg.pruning, budget)] = a.checkpoint
    if a.sft_reference:
        models[SFT_REFERENCE] = a.sft_reference
    for spec in a.trained:
        key, path = spec.split("=", 1)
        method, budget = key.split(":")
        models[(method, float(budget))] = path
    filed = {k[0] for k in models if isinstance(k, tuple)}
    if not [m for m in a.methods if kind(m) != "trained" or m in filed]:  # the report would hold `unpruned` only
        p.error(
            f"--methods {' '.join(a.methods)}: no model for any of them ({a.checkpoint} is a {cfg.pruning!r} "
            "checkpoint; add that method, or name one with --trained METHOD:SHARE=DIR)"
        )
    settings = dataclasses.replace(
        d,
        shards=a.shards,
        budgets=a.budgets,
        methods=a.methods,
        limit=a.limit,
        batch_size=a.batch_size,
        timing_repeats=a.timing_repeats,
        hard_layout=a.hard_layout,
    )
    evaluate_checkpoints(models, Path(a.out), settings, title=a.checkpoint)
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0
