"""Evaluation reporting: a method's results as a record (`Record`, pipeline/eval/records.py), the
summary of the goals, report.json, report.md and the plots (pipeline/eval/plots.py). The running is
pipeline/eval/evaluate.py's."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.eval.methods import POLICIES, SFT_REFERENCE, UNPRUNED
from pipeline.eval.records import Record
from pipeline.eval.samples import Sample


@dataclass
class Result:
    """One method's measurements on the samples, before they become a report record."""

    correct: list[bool]
    tokens: dict  # family -> TokenStats summary; "all" -> overall
    text_len: float
    diagnostics: dict = field(default_factory=dict)  # pipeline/eval/diagnostics.py: Record fields by name


def record(
    method: str,
    budget: float | None,
    result: Result,
    samples: list[Sample],
    config,
    reference: Record | None,
    describe: dict | None = None,
) -> Record:
    """The record of one method's `result`; `reference`: the unpruned model's (None for that one)."""
    from model.cost import model_costs

    lv = config.num_visual_tokens
    acc = _accuracy(result.correct, samples)
    tokens = result.tokens["all"]
    per_layer = tokens["tokens_per_layer"] or [0.0] * config.text_config.num_hidden_layers
    costs = model_costs(per_layer, result.text_len, config)
    atp_layers = list(config.atp_layers)
    by_family = {f: s for f, s in result.tokens.items() if f != "all"}
    rec = Record(
        method=method,
        budget=budget,
        budget_tokens=None if budget is None else budget * lv,
        accuracy=acc["all"],
        accuracy_by_family=acc["family"],
        accuracy_by_qtype=acc["qtype"],
        n_bar=tokens["n_bar"],
        n_bar_share=None if tokens["n_bar"] is None else tokens["n_bar"] / lv,
        tokens_per_layer=per_layer,
        tokens_per_layer_by_family={f: s["tokens_per_layer"] for f, s in by_family.items()},
        # tokens kept after each ATP module (= attended by layer i_k), per family: the adaptivity claim
        kept_at_atp_layers_by_family={
            f: [s["tokens_per_layer"][i] for i in atp_layers] for f, s in by_family.items() if s["tokens_per_layer"]
        },
        flops_paper=costs["flops_paper"],
        flops_exact=costs["flops_exact"],
        kv_cache_bytes=costs["kv_cache_bytes"],
        atp_flops=costs["atp_flops"],
        **result.diagnostics,
        samples=len(samples),
        describe=describe or {},
    )
    if reference is not None:
        rec.retention = _ratio(rec.accuracy, reference.accuracy)
        rec.retention_by_family = {
            f: _ratio(a, reference.accuracy_by_family.get(f)) for f, a in rec.accuracy_by_family.items()
        }
        rec.flops_paper_ratio = _ratio(rec.flops_paper, reference.flops_paper)
        rec.flops_exact_ratio = _ratio(rec.flops_exact, reference.flops_exact)
        rec.kv_cache_bytes_ratio = _ratio(rec.kv_cache_bytes, reference.kv_cache_bytes)
    return rec


def _ratio(x: float, reference: float | None) -> float | None:
    """x / reference; None when the reference is 0 or unknown."""
    return x / reference if reference else None


def _accuracy(correct: list[bool], samples: list[Sample]) -> dict:
    fam, qt = defaultdict(list), defaultdict(list)
    for c, s in zip(correct, samples):
        fam[s.family].append(c)
        qt[s.qtype].append(c)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "all": mean(correct),
        "family": {k: mean(v) for k, v in sorted(fam.items())},
        "qtype": {k: mean(v) for k, v in sorted(qt.items())},
    }


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


def write_report(out: Path, records: list[Record], meta: dict, overlays: list | None = None, base_bar=None) -> dict:
    """report.json, report.md and the plots; returns report.json's content. base_bar(records,
    prior_accuracy) -> dict: a pass/fail bar of the caller's (the base stage's), kept as summary.base."""
    from pipeline.eval import plots

    out.mkdir(parents=True, exist_ok=True)
    goals = summary(records)
    if base_bar is not None:
        goals["base"] = base_bar(records, meta["prior_accuracy"])
    report = {"meta": meta, "records": [r.to_json() for r in records], "summary": goals}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(markdown(meta, records, goals))
    plots.pareto(records, out / "accuracy_vs_nbar.png")
    plots.tokens_per_layer(records, meta.get("atp_layers", []), out / "kept_tokens_per_layer.png")
    if overlays:
        plots.overlays(overlays, out / "kept_tokens_overlay.png")
    return report


def summary(records: list[Record]) -> dict:
    """The method's goals, computed from the records (reported whether met or not)."""
    ref = next((r for r in records if r.method == UNPRUNED), None)
    by = {(r.method, r.budget): r for r in records}
    budgets = sorted({r.budget for r in records if r.budget is not None}, reverse=True)
    sft = next((r for r in records if r.method == SFT_REFERENCE), None)
    out = {"unpruned_accuracy": None if ref is None else ref.accuracy, "budgets": {}}
    if sft is not None:
        out["unpruned_sft_accuracy"] = sft.accuracy
    for b in budgets:
        row = {}
        atp = by.get(("atp", b))
        free = [r for r in records if r.budget == b and r.method in POLICIES]
        best_free = max(free, key=lambda r: r.accuracy) if free else None
        if atp is not None:
            row["atp_retention"] = atp.retention
            if atp.retention_vs_sft is not None:
                row["atp_retention_vs_sft"] = atp.retention_vs_sft
            row["atp_n_bar_share"] = atp.n_bar_share
            fam = atp.kept_at_atp_layers_by_family
            if "fine" in fam and "coarse" in fam and sum(fam["coarse"]) > 0:
                row["fine_over_coarse_kept"] = sum(fam["fine"]) / sum(fam["coarse"])
            if best_free is not None:
                row["best_training_free"] = best_free.method
                row["atp_minus_best_training_free"] = atp.accuracy - best_free.accuracy
            if ("fixed", b) in by:
                row["atp_minus_fixed"] = atp.accuracy - by[("fixed", b)].accuracy
            row.update(adaptivity(atp))
            if atp.prefill_ms_ratio and atp.flops_exact_ratio and atp.flops_exact_ratio < 1:
                # time reduction as a share of the FLOPs reduction (goal >= 0.9)
                row["prefill_vs_flops_reduction"] = (1 - atp.prefill_ms_ratio) / (1 - atp.flops_exact_ratio)
            if atp.atp_flops and atp.flops_exact:
                row["atp_module_flops_share"] = atp.atp_flops / atp.flops_exact
        out["budgets"][str(b)] = row
    return out


def adaptivity(rec: Record) -> dict:
    """How much a record's kept tokens follow the question and the image (issue: ATP must adapt):
    N_bar fine / coarse, counting / background questions, the per-image spread and the rank
    correlation of an image's N_bar with its number of small shapes (keys absent when unknown)."""
    out = {}
    fam = {f: sum(v) / len(v) for f, v in rec.tokens_per_layer_by_family.items() if v}
    if fam.get("coarse"):
        out["fine_over_coarse_n_bar"] = fam.get("fine", 0.0) / fam["coarse"]
    by_q = rec.n_bar_by_qtype or {}
    if by_q.get("background") and by_q.get("count_total") is not None:
        out["count_over_background_n_bar"] = by_q["count_total"] / by_q["background"]
    if rec.n_bar_spread:
        out["n_bar_spread_std"] = rec.n_bar_spread["std"]
    if rec.rank_corr_n_bar_shapes is not None:
        out["rank_corr_n_bar_shapes"] = rec.rank_corr_n_bar_shapes
    return out


def _timing_note(meta) -> str:
    from pipeline.eval.timing import MIN_REPEATS, SPREAD_MARK

    n = meta.get("timing_repeats")
    batches = " and ".join(map(str, meta.get("timing_batches") or [meta.get("timing_batch")]))
    note = (
        f"Times: every method interleaved in one process, at batch {batches}; median of {n} repeats after "
        f"warm-up; a time ratio is the median of the per-repeat ratios to `unpruned`, `~` when those spread "
        f"over {SPREAD_MARK:.0%}."
    )
    if n is not None and n < MIN_REPEATS:
        note += f" **{n} repeat(s): fewer than {MIN_REPEATS}, the times are not for publication.**"
    return note


def _time_cell(r: Record, batch, kind):
    """A time ratio to unpruned at one batch size, `~` when its per-repeat ratios spread over 10%."""
    t = (r.timing or {}).get(str(batch), {})
    ratio = t.get("prefill_ratio" if kind == "prefill" else "decode_ratio")
    if ratio is None:
        return "-"
    return f"{ratio['ratio']:.3f}{'~' if ratio['noisy'] else ''}"


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown(meta: dict, records: list[Record], goals: dict) -> str:
    """report.md: the tables of the records, then the goals (`summary`) and the methods."""
    lines = [
        f"# Evaluation: {meta.get('title', '')}",
        "",
        f"{meta.get('samples')} eval samples ({meta.get('shards')}), Lv = {meta.get('lv')}, "
        f"{meta.get('num_layers')} decoder layers, ATP layers {meta.get('atp_layers')}, "
        f"{meta.get('hard_layout', 'padded')} hard layout; "
        f"{meta.get('device')}, {meta.get('date')}. {_timing_note(meta)}",
        "",
    ]
    prior = meta.get("prior_accuracy")
    if prior:
        lines += [
            "No-image answer prior (most common answer per question type): "
            + ", ".join(f"{k} {v:.3f}" for k, v in prior["family"].items()),
            "",
        ]
    families = sorted({f for r in records for f in r.accuracy_by_family})
    vs_sft = any(r.retention_vs_sft is not None for r in records)
    head = ["method", "budget", "N_bar", "N_bar %", "acc", *families, "retention", *["vs sft"] * vs_sft]
    batches = meta.get("timing_batches") or [meta.get("timing_batch")]
    head += ["FLOPs", "KV", *(f"{k} B={b}" for k in ("prefill", "decode") for b in batches)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append(
            "| "
            + " | ".join(
                [
                    r.method,
                    _f(r.budget, "{:.0%}"),
                    _f(r.n_bar, "{:.1f}"),
                    _f(r.n_bar_share, "{:.1%}"),
                    _f(r.accuracy),
                    *(_f(r.accuracy_by_family.get(f)) for f in families),
                    _f(r.retention, "{:.1%}"),
                    *[_f(r.retention_vs_sft, "{:.1%}")] * vs_sft,
                    _f(r.flops_exact_ratio, "{:.3f}"),
                    _f(r.kv_cache_bytes_ratio, "{:.3f}"),
                    *(_time_cell(r, b, k) for k in ("prefill", "decode") for b in batches),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Ratios are against `unpruned` (the untouched base); `vs sft`: retention against `unpruned-sft`, the"
        " unpruned model after the same sft recipe and steps as the trained variants. FLOPs: exact count"
        " (model/cost.py).",
        "",
        "## Accuracy per question type",
        "",
    ]
    qtypes = sorted({q for r in records for q in r.accuracy_by_qtype})
    lines += ["| method | budget | " + " | ".join(qtypes) + " |", "|" + "---|" * (len(qtypes) + 2)]
    for r in records:
        lines.append(
            f"| {r.method} | {_f(r.budget, '{:.0%}')} | "
            + " | ".join(_f(r.accuracy_by_qtype.get(q)) for q in qtypes)
            + " |"
        )
    lines += [
        "",
        "## Where the kept tokens sit",
        "",
        "Object recall: the share of visual tokens covering a shape (small: a small shape) that reach the"
        " last layer; after each pruning point in brackets. Background: the share of the last layer's"
        " visual tokens that cover no shape (pipeline/eval/diagnostics.py).",
        "",
        "| method | budget | object recall | small-shape recall | background share | N_bar by question type |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.object_recall is None:  # no sample with a scene
            continue
        per_point = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        by_qtype = ", ".join(f"{q} {_f(v, '{:.1f}')}" for q, v in r.n_bar_by_qtype.items())
        lines.append(
            f"| {r.method} | {_f(r.budget, '{:.0%}')} "
            f"| {r.object_recall:.3f} [{per_point(r.object_recall_per_point)}] "
            f"| {r.small_recall:.3f} [{per_point(r.small_recall_per_point)}] "
            f"| {r.background_share:.3f} "
            f"| {by_qtype} |"
        )
    branches = [r for r in records if r.kept_by_branch]
    if branches:
        lines += ["", "ATP: kept tokens per image after each module, by the branch that kept them:", ""]
        for r in branches:
            lines.append(
                f"- atp @ {_f(r.budget, '{:.0%}')}: "
                + "; ".join(f"{k} {[round(x, 1) for x in v]}" for k, v in r.kept_by_branch.items())
            )
    lines += [
        "",
        "## Adaptivity",
        "",
        "How far each method's kept tokens follow the question and the image: N_bar of fine over coarse"
        " questions, of counting over background questions, the spread of N_bar over images (std [10th,"
        " 90th percentile]) and Spearman's rank correlation of an image's N_bar with its number of small shapes.",
        "",
        "| method | budget | fine / coarse | count / background | N_bar spread | rank corr. with shapes |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.budget is None:
            continue
        a, spread = adaptivity(r), r.n_bar_spread
        lines.append(
            f"| {r.method} | {_f(r.budget, '{:.0%}')} | {_f(a.get('fine_over_coarse_n_bar'), '{:.2f}')} "
            f"| {_f(a.get('count_over_background_n_bar'), '{:.2f}')} "
            f"| {'-' if not spread else '{std:.1f} [{p10:.1f}, {p90:.1f}]'.format(**spread)} "
            f"| {_f(a.get('rank_corr_n_bar_shapes'), '{:+.2f}')} |"
        )
    lines += ["", "## Tokens kept after each ATP module, per family", ""]
    for r in records:
        if r.method == "atp":
            fam = r.kept_at_atp_layers_by_family
            lines.append(
                f"- atp @ {_f(r.budget, '{:.0%}')}: "
                + "; ".join(f"{f} {[round(x, 1) for x in v]}" for f, v in sorted(fam.items()))
            )
    compared = {"atp_minus_fixed", "best_training_free"}
    rows = [(b, v) for b, v in goals["budgets"].items() if compared & set(v)]
    if rows:
        lines += [
            "",
            "## ATP against `fixed` (same recipe and steps) and the best training-free method",
            "",
            "| budget | atp - fixed | best training-free | atp - best | atp N_bar % |",
            "|---|---|---|---|---|",
        ]
        for b, v in rows:
            lines.append(
                f"| {float(b):.0%} | {_f(v.get('atp_minus_fixed'), '{:+.3f}')} | {v.get('best_training_free', '-')} "
                f"| {_f(v.get('atp_minus_best_training_free'), '{:+.3f}')} | {_f(v.get('atp_n_bar_share'), '{:.1%}')} |"
            )
    lines += ["", "## Goals", "", "```", json.dumps(goals, indent=1), "```", ""]
    lines += ["## Methods", ""]
    seen = set()
    for r in records:
        if r.describe and r.method not in seen:
            seen.add(r.method)
            lines.append(
                f"- **{r.method}**: "
                + "; ".join(f"{k}: {v}" for k, v in r.describe.items() if k not in ("counts", "layers"))
            )
    return "\n".join(lines) + "\n"
