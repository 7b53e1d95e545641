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
Writes report.json (one record per method x budget), report.md and PNG plots (pipeline/plots.py).
Scoring is pipeline/answers.py's, shared with the lmms-eval plugin.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.baselines import POLICIES, make_policy
from model.budget import n_bar
from pipeline.answers import TokenStats, greedy_answers, is_correct, prompt_for, split_processor

log = logging.getLogger(__name__)
TRAINED = ("atp", "fixed")
ALL_METHODS = TRAINED + POLICIES


@dataclass
class Sample:
    key: str
    image: object  # PIL image
    question: str
    answer: str
    qtype: str
    family: str


def load_samples(shards: str, limit: int | None = None) -> list[Sample]:
    """The eval split's first question of each sample, in shard order."""
    import webdataset as wds
    from PIL import Image

    from pipeline.data import list_shards

    out = []
    for sample in wds.DataPipeline(wds.SimpleShardList(list_shards(shards)), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])
        image_key = next(k for k in ("png", "jpg", "jpeg") if k in sample)
        conv = meta["conversations"]
        out.append(Sample(key=sample["__key__"], image=Image.open(io.BytesIO(sample[image_key])).convert("RGB"),
                          question=conv[0]["value"].replace("<image>", "").strip(), answer=conv[1]["value"],
                          qtype=meta["qtype"], family=meta["family"]))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no eval samples in {shards}")
    return out


# ------------------------------------------------------------------ one model, one method

@dataclass
class Result:
    correct: list[bool]
    tokens: dict  # family -> TokenStats summary; "all" -> overall
    text_len: float
    timing: dict = field(default_factory=dict)


def run_method(model, processor, samples: list[Sample], *, batch_size: int, max_new_tokens: int) -> Result:
    """Greedy answers (hard pruning in eval mode), scored per sample, tokens per family."""
    by_family = defaultdict(list)
    for i, s in enumerate(samples):
        by_family[s.family].append(i)
    correct = [False] * len(samples)
    stats = {}
    overall = TokenStats()
    for family, idx in sorted(by_family.items()):
        st = TokenStats()
        preds = greedy_answers(model, processor, [prompt_for(samples[i].question) for i in idx],
                               [samples[i].image for i in idx], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, stats=st)
        for i, p in zip(idx, preds):
            correct[i] = is_correct(p, samples[i].answer)
        stats[family] = st.summary()
        overall.merge(st)
    stats["all"] = overall.summary()
    tokenizer, _ = split_processor(processor)
    text_len = statistics.mean(len(tokenizer(prompt_for(s.question))["input_ids"]) for s in samples)
    return Result(correct=correct, tokens=stats, text_len=text_len)


@torch.no_grad()
def time_model(model, processor, samples: list[Sample], *, repeats: int, decode_tokens: int) -> dict:
    """Median prefill time of one batch of `samples`, and median time per decoded token
    (pruned KV cache), over `repeats` after one warm-up."""
    from transformers import DynamicCache

    from model import CACHE_KW

    cfg = model.config
    inputs = _prompt_inputs(model, processor, samples)
    prefill, decode = [], []
    for r in range(repeats + 1):
        cache = DynamicCache(config=cfg.text_config)
        t0 = time.perf_counter()
        out = model(**inputs, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        if r:  # the first pass warms up allocators and kernels
            prefill.append(t1 - t0)
            decode.append((t2 - t1) / decode_tokens)
    return {"prefill_ms": 1e3 * statistics.median(prefill), "decode_ms_per_token": 1e3 * statistics.median(decode),
            "timing_batch": len(samples), "timing_repeats": repeats}


def _prompt_inputs(model, processor, samples: list[Sample]) -> dict:
    """Model inputs of the samples' questions, prompted and tokenised as pipeline/answers.py does."""
    from pipeline.answers import _model_inputs, encode_prompt

    tokenizer, image_processor = split_processor(processor)
    cfg = model.config
    rows = [encode_prompt(prompt_for(s.question), tokenizer, image_token_id=cfg.image_token_id,
                          num_image_tokens=cfg.num_visual_tokens) for s in samples]
    return _model_inputs(model, tokenizer, image_processor, rows, [s.image for s in samples])


# ------------------------------------------------------------------ records and the report

def record(method: str, budget: float | None, result: Result, samples: list[Sample], config,
           reference: dict | None, describe: dict | None = None) -> dict:
    from model.cost import model_costs

    lv = config.num_visual_tokens
    acc = _accuracy(result.correct, samples)
    tokens = result.tokens["all"]
    per_layer = tokens["tokens_per_layer"] or [0.0] * config.text_config.num_hidden_layers
    costs = model_costs(per_layer, result.text_len, config)
    atp_layers = list(config.atp_layers)
    rec = {
        "method": method,
        "budget": budget,
        "budget_tokens": None if budget is None else budget * lv,
        "accuracy": acc["all"],
        "accuracy_by_family": acc["family"],
        "accuracy_by_qtype": acc["qtype"],
        "n_bar": tokens["n_bar"],
        "n_bar_share": None if tokens["n_bar"] is None else tokens["n_bar"] / lv,
        "tokens_per_layer": per_layer,
        "tokens_per_layer_by_family": {f: s["tokens_per_layer"] for f, s in result.tokens.items() if f != "all"},
        # tokens kept after each ATP module (= attended by layer i_k), per family: the adaptivity claim
        "kept_at_atp_layers_by_family": {f: [s["tokens_per_layer"][i] for i in atp_layers]
                                         for f, s in result.tokens.items() if f != "all" and s["tokens_per_layer"]},
        "flops_paper": costs["flops_paper"],
        "flops_exact": costs["flops_exact"],
        "kv_cache_bytes": costs["kv_cache_bytes"],
        "atp_flops": costs["atp_flops"],
        **result.timing,
        "samples": len(samples),
        "describe": describe or {},
    }
    if reference is not None:
        rec["retention"] = rec["accuracy"] / reference["accuracy"] if reference["accuracy"] else None
        rec["retention_by_family"] = {f: (a / reference["accuracy_by_family"][f]
                                          if reference["accuracy_by_family"].get(f) else None)
                                      for f, a in acc["family"].items()}
        for key in ("flops_paper", "flops_exact", "kv_cache_bytes", "prefill_ms", "decode_ms_per_token"):
            if key in rec and reference.get(key):
                rec[f"{key}_ratio"] = rec[key] / reference[key]
    return rec


def _accuracy(correct: list[bool], samples: list[Sample]) -> dict:
    fam, qt = defaultdict(list), defaultdict(list)
    for c, s in zip(correct, samples):
        fam[s.family].append(c)
        qt[s.qtype].append(c)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"all": mean(correct), "family": {k: mean(v) for k, v in sorted(fam.items())},
            "qtype": {k: mean(v) for k, v in sorted(qt.items())}}


def prior_accuracy(samples: list[Sample]) -> dict:
    """The no-image answer prior: always answering a question type's most common answer
    (learned from the same samples, an upper bound of what text alone can do)."""
    best = {}
    by_q = defaultdict(list)
    for s in samples:
        by_q[s.qtype].append(s.answer)
    for q, answers in by_q.items():
        best[q] = max(set(answers), key=answers.count)
    return _accuracy([s.answer == best[s.qtype] for s in samples], samples)


class Evaluator:
    """Runs methods on shared samples and collects records; `reference` is the unpruned one."""

    def __init__(self, samples: list[Sample], *, batch_size: int, max_new_tokens: int, timing_batch: int,
                 timing_repeats: int, decode_tokens: int, progress: bool = True):
        self.samples = samples
        self.kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.timing = dict(repeats=timing_repeats, decode_tokens=decode_tokens)
        self.timing_samples = samples[:timing_batch]
        self.records: list[dict] = []
        self.reference: dict | None = None
        self.progress = progress

    def add(self, method: str, budget: float | None, model, processor, describe: dict | None = None) -> dict:
        t0 = time.time()
        result = run_method(model, processor, self.samples, **self.kw)
        result.timing = time_model(model, processor, self.timing_samples, **self.timing)
        rec = record(method, budget, result, self.samples, model.config, self.reference, describe)
        rec["eval_seconds"] = round(time.time() - t0, 1)
        if method == "unpruned":
            self.reference = rec
        self.records.append(rec)
        log.info("%-10s budget %-5s acc %.3f n_bar %s (%.0f s)", method, budget, rec["accuracy"],
                 "-" if rec["n_bar"] is None else f"{rec['n_bar']:.1f}", rec["eval_seconds"])
        return rec


def write_report(out: Path, records: list[dict], meta: dict, overlays: list | None = None) -> dict:
    from pipeline import plots

    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "records": records, "summary": summary(records)}
    if meta.get("prior_accuracy"):
        report["summary"]["base"] = base_goals(records, meta["prior_accuracy"])
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(markdown(report))
    plots.pareto(records, out / "accuracy_vs_nbar.png")
    plots.tokens_per_layer(records, meta.get("atp_layers", []), out / "kept_tokens_per_layer.png")
    if overlays:
        plots.overlays(overlays, out / "kept_tokens_overlay.png")
    return report


def summary(records: list[dict]) -> dict:
    """The issue's goals, computed from the records (reported whether met or not)."""
    ref = next((r for r in records if r["method"] == "unpruned"), None)
    by = {(r["method"], r["budget"]): r for r in records}
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None}, reverse=True)
    out = {"unpruned_accuracy": None if ref is None else ref["accuracy"], "budgets": {}}
    for b in budgets:
        row = {}
        atp = by.get(("atp", b))
        free = [r for r in records if r["budget"] == b and r["method"] in POLICIES]
        best_free = max(free, key=lambda r: r["accuracy"]) if free else None
        if atp is not None:
            row["atp_retention"] = atp.get("retention")
            row["atp_n_bar_share"] = atp["n_bar_share"]
            fam = atp["kept_at_atp_layers_by_family"]
            if "fine" in fam and "coarse" in fam and sum(fam["coarse"]) > 0:
                row["fine_over_coarse_kept"] = sum(fam["fine"]) / sum(fam["coarse"])
            if best_free is not None:
                row["best_training_free"] = best_free["method"]
                row["atp_minus_best_training_free"] = atp["accuracy"] - best_free["accuracy"]
            if ("fixed", b) in by:
                row["atp_minus_fixed"] = atp["accuracy"] - by[("fixed", b)]["accuracy"]
            if atp.get("prefill_ms_ratio") and atp.get("flops_exact_ratio") and atp["flops_exact_ratio"] < 1:
                # time reduction as a share of the FLOPs reduction (goal >= 0.9)
                row["prefill_vs_flops_reduction"] = (1 - atp["prefill_ms_ratio"]) / (1 - atp["flops_exact_ratio"])
            if atp.get("atp_flops") and atp.get("flops_exact"):
                row["atp_module_flops_share"] = atp["atp_flops"] / atp["flops_exact"]
        out["budgets"][str(b)] = row
    return out


def base_goals(records: list[dict], prior: dict) -> dict:
    """The embedded base's bar (issue 6): unpruned coarse >= 0.95 and fine >= 0.85, every
    question type above its no-image prior, and random pruning at the smallest budget losing
    >= 10 points on fine and less on coarse (else the benchmark does not discriminate)."""
    ref = next((r for r in records if r["method"] == "unpruned"), None)
    if ref is None:
        return {}
    fam, qt = ref["accuracy_by_family"], ref["accuracy_by_qtype"]
    out = {"coarse": fam.get("coarse"), "fine": fam.get("fine"),
           "qtype_margin_over_prior": {q: a - prior["qtype"][q] for q, a in qt.items() if q in prior["qtype"]}}
    out["every_qtype_above_prior"] = all(m > 0 for m in out["qtype_margin_over_prior"].values())
    randoms = [r for r in records if r["method"] == "random" and r["budget"] is not None]
    if randoms:
        r = min(randoms, key=lambda r: r["budget"])
        drop = {f: fam[f] - a for f, a in r["accuracy_by_family"].items() if f in fam}
        out["random_budget"] = r["budget"]
        out["random_drop"] = drop
        if "fine" in drop and "coarse" in drop:
            out["discriminates"] = drop["fine"] >= 0.10 and drop["coarse"] < drop["fine"]
    out["met"] = bool((out["coarse"] or 0) >= 0.95 and (out["fine"] or 0) >= 0.85
                      and out["every_qtype_above_prior"] and out.get("discriminates", False))
    return out


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    meta, records = report["meta"], report["records"]
    lines = [f"# Evaluation: {meta.get('title', '')}", "",
             f"{meta.get('samples')} eval samples ({meta.get('shards')}), Lv = {meta.get('lv')}, "
             f"{meta.get('num_layers')} decoder layers, ATP layers {meta.get('atp_layers')}; "
             f"{meta.get('device')}, {meta.get('date')}. Times: median of {meta.get('timing_repeats')} "
             f"repeats on a batch of {meta.get('timing_batch')}, same process.", ""]
    prior = meta.get("prior_accuracy")
    if prior:
        lines += ["No-image answer prior (most common answer per question type): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in prior["family"].items()), ""]
    families = sorted({f for r in records for f in r["accuracy_by_family"]})
    head = ["method", "budget", "N_bar", "N_bar %", "acc", *families, "retention", "FLOPs", "KV", "prefill", "decode"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append("| " + " | ".join([
            r["method"], _f(r["budget"], "{:.0%}"), _f(r["n_bar"], "{:.1f}"), _f(r["n_bar_share"], "{:.1%}"),
            _f(r["accuracy"]), *(_f(r["accuracy_by_family"].get(f)) for f in families),
            _f(r.get("retention"), "{:.1%}"), _f(r.get("flops_exact_ratio"), "{:.3f}"),
            _f(r.get("kv_cache_bytes_ratio"), "{:.3f}"), _f(r.get("prefill_ms_ratio"), "{:.3f}"),
            _f(r.get("decode_ms_per_token_ratio"), "{:.3f}")]) + " |")
    lines += ["", "Ratios are against `unpruned`. FLOPs: exact count (model/cost.py).", "",
              "## Accuracy per question type", ""]
    qtypes = sorted({q for r in records for q in r["accuracy_by_qtype"]})
    lines += ["| method | budget | " + " | ".join(qtypes) + " |", "|" + "---|" * (len(qtypes) + 2)]
    for r in records:
        lines.append(f"| {r['method']} | {_f(r['budget'], '{:.0%}')} | "
                     + " | ".join(_f(r["accuracy_by_qtype"].get(q)) for q in qtypes) + " |")
    lines += ["", "## Tokens kept after each ATP module, per family", ""]
    for r in records:
        if r["method"] == "atp":
            fam = r["kept_at_atp_layers_by_family"]
            lines.append(f"- atp @ {_f(r['budget'], '{:.0%}')}: " + "; ".join(
                f"{f} {[round(x, 1) for x in v]}" for f, v in sorted(fam.items())))
    lines += ["", "## Goals", "", "```", json.dumps(report["summary"], indent=1), "```", ""]
    lines += ["## Methods", ""]
    seen = set()
    for r in records:
        if r["describe"] and r["method"] not in seen:
            seen.add(r["method"])
            d = dict(r["describe"])
            lines.append(f"- **{r['method']}**: " + "; ".join(f"{k}: {v}" for k, v in d.items()
                                                            if k not in ("counts", "layers")))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ models

def load_model(path, pruning: str | None = None, dtype=torch.float32):
    """An exported (or any saved AtpLlava) dir in eval mode, with its processor pair."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration

    config = AtpLlavaConfig.from_pretrained(path)
    if pruning is not None:
        config.pruning = pruning
    model = AtpLlavaForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, (AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


def overlay_data(model, processor, samples: list[Sample]) -> list[dict]:
    """Kept-token masks after each ATP module (hard path) for a few images: paper Fig. 4."""
    cfg = model.config
    out = []
    with torch.no_grad():
        for s in samples:
            res = model(**_prompt_inputs(model, processor, [s]))
            if res.atp_info is None:
                continue
            out.append({"image": s.image, "keep": res.atp_info["keep"][0].float().cpu(), "grid": cfg.grid_size,
                        "title": f"{s.family}: {s.question}", "layers": list(cfg.atp_layers)})
    return out


def evaluate_checkpoints(models: dict, shards: str, out: Path, *, budgets, methods, limit=None, batch_size=32,
                         max_new_tokens=4, timing_batch=8, timing_repeats=5, decode_tokens=8,
                         overlay_images=4, title="") -> dict:
    """models: "unpruned" -> dir, ("atp"|"fixed", budget) -> dir (missing ones are skipped
    with a warning). Policies run on the unpruned model. methods None: ALL_METHODS."""
    from tqdm import tqdm

    methods = ALL_METHODS if methods is None else methods
    samples = load_samples(shards, limit)
    ev = Evaluator(samples, batch_size=batch_size, max_new_tokens=max_new_tokens, timing_batch=timing_batch,
                   timing_repeats=timing_repeats, decode_tokens=decode_tokens)
    base, proc = load_model(models["unpruned"], pruning="none")
    jobs = [("unpruned", None)] + [(m, b) for b in budgets for m in methods]
    overlays = []
    with tqdm(total=len(jobs), desc="eval", unit="method") as bar:
        for method, budget in jobs:
            bar.set_postfix_str(f"{method} {'' if budget is None else f'{budget:.0%}'}")
            if method == "unpruned":
                ev.add(method, None, base, proc)
            elif method in TRAINED:
                path = models.get((method, budget))
                if path is None or not Path(path).exists():
                    log.warning("no %s model for budget %s (%s): skipped", method, budget, path)
                else:
                    model, p = load_model(path, pruning=method)
                    ev.add(method, budget, model, p, describe=_trained_describe(model.config))
                    if method == "atp" and overlay_images and not overlays:
                        overlays = overlay_data(model, p, _overlay_samples(samples, overlay_images))
                    del model
            else:
                base.pruning_policy = make_policy(method, base.config, budget)
                try:
                    ev.add(method, budget, base, proc, describe=base.pruning_policy.describe())
                finally:
                    base.pruning_policy = None
            bar.update()
    cfg = base.config
    meta = {"title": title, "shards": str(shards), "samples": len(samples), "lv": cfg.num_visual_tokens,
            "num_layers": cfg.text_config.num_hidden_layers, "atp_layers": list(cfg.atp_layers),
            "budgets": list(budgets), "methods": list(methods), "models": {str(k): str(v) for k, v in models.items()},
            "prior_accuracy": prior_accuracy(samples), "device": _device(), "date": time.strftime("%Y-%m-%d"),
            "timing_batch": len(ev.timing_samples), "timing_repeats": timing_repeats,
            "torch_threads": torch.get_num_threads()}
    return write_report(out, ev.records, meta, overlays)


def _trained_describe(config) -> dict:
    if config.pruning == "fixed":
        return {"name": "fixed", "paper": "ATP-LLaVA Table 2 (pre-defined counts)",
                "layers": list(config.atp_layers), "counts": list(config.fixed_counts),
                "differs": "ranked by S_redundant, trained with the same SFT recipe"}
    return {"name": "atp", "paper": "ATP-LLaVA (arXiv 2412.00447)", "layers": list(config.atp_layers),
            "target_tokens": config.target_tokens}


def _overlay_samples(samples, n):
    """Alternate families so the overlay shows both."""
    fams = defaultdict(list)
    for s in samples:
        fams[s.family].append(s)
    picked = []
    while len(picked) < n and any(fams.values()):
        for f in sorted(fams):
            if fams[f] and len(picked) < n:
                picked.append(fams[f].pop(0))
    return picked


def _device() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


# ------------------------------------------------------------------ the CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="exported (or any saved AtpLlava) dir: the unpruned "
                   "reference runs it with pruning=none, `atp`/`fixed` with its own pruning")
    p.add_argument("--shards", required=True, help="eval shards (folder or brace pattern)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.15, 0.11])
    p.add_argument("--trained", nargs="*", default=[], metavar="METHOD:BUDGET=DIR",
                   help="more trained checkpoints, e.g. atp:0.11=runs/x/variants/atp-11/export")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timing-repeats", type=int, default=5)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from model import AtpLlavaConfig

    cfg = AtpLlavaConfig.from_pretrained(a.checkpoint)
    models = {"unpruned": a.checkpoint}
    if cfg.pruning in TRAINED:  # the checkpoint itself, at the budget it was trained for
        share = (cfg.target_tokens if cfg.pruning == "atp" else _fixed_n_bar(cfg)) / cfg.num_visual_tokens
        near = min(a.budgets, key=lambda b: abs(b - share))
        models[(cfg.pruning, near)] = a.checkpoint
    for spec in a.trained:
        key, path = spec.split("=", 1)
        method, budget = key.split(":")
        models[(method, float(budget))] = path
    evaluate_checkpoints(models, a.shards, Path(a.out), budgets=a.budgets, methods=a.methods, limit=a.limit,
                         batch_size=a.batch_size, timing_repeats=a.timing_repeats, title=a.checkpoint)
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


def _fixed_n_bar(cfg) -> float:
    """N_bar (METHOD sec 7) of a `fixed` model's counts."""
    return n_bar(cfg.atp_layers, cfg.fixed_counts, cfg.text_config.num_hidden_layers, cfg.num_visual_tokens)
