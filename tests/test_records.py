"""pipeline/eval/records.py: report.json's records as typed `Record`s.

An evaluation on stand-ins (no model: the answers, kept tokens and times are given, the rest is
`Evaluator` and `report.record` as they run) gives records whose JSON must equal, key order
included, what the code before `Record` wrote for the same inputs (OLD_*, captured from it);
from_json reads them back, and older report.json files too."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

GRID, LV, LAYERS = 4, 16, 6
SCENE = {
    "big": {"kind": "square", "box": [0, 0, 16, 16]},  # tokens 0, 1, 4, 5 of a 32-px image
    "small": [{"kind": "square", "box": [25, 25, 31, 31]}],  # token 15
}
QUESTIONS = [("coarse", "background"), ("coarse", "big_color"), ("fine", "count_total"), ("fine", "cell_color")]


def _config(pruning):
    from tiny_models import tiny_atp

    config = copy.deepcopy(tiny_atp(atp_layers=(2, 4))[1].config)
    config.pruning = pruning
    return config


def _result(correct, kept, scene=True, branch=False):
    """A method's Result: `correct` per sample; `kept`: visual tokens kept after layer 2 and after
    layer 4 (every sample alike); where they sit from a real `Diagnostics` (token 0..kept-1 kept)."""
    from pipeline.eval.diagnostics import Diagnostics
    from pipeline.eval.report import Result
    from shards.objects import object_map

    per_layer = [float(LV)] * 2 + [float(kept[0])] * 2 + [float(kept[1])] * 2
    summary = dict(image_samples=2, text_only_samples=0, n_bar=sum(per_layer) / LAYERS, tokens_per_layer=per_layer)
    diag = Diagnostics(GRID, LV)
    keep = torch.zeros(2, LV, dtype=torch.bool)
    keep[0, : kept[0]], keep[1, : kept[1]] = True, True
    for i, (_, qtype) in enumerate(QUESTIONS):
        labels = object_map(SCENE, 32, GRID) if scene else None
        diag.add(
            qtype,
            labels,
            torch.tensor(per_layer) - i,  # the images differ in N_bar
            keep=keep if kept[0] < LV else None,
            branch=(keep.to(torch.int8) * (1 + i % 3)) if branch else None,
            n_shapes=(i * 7) % 3 if scene else None,
        )
    return Result(
        correct=correct,
        tokens={"coarse": summary, "fine": summary, "all": summary},
        text_len=12.5,
        diagnostics=diag.summary(),
    )


def evaluate_stand_ins(monkeypatch) -> list:
    """unpruned, unpruned-sft, atp and uniform (no scenes) through `Evaluator.add` and `time_all`,
    the models' answers and times given; returns the records (dicts before `Record`)."""
    from pipeline.eval import evaluate

    samples = [SimpleNamespace(family=f, qtype=q) for f, q in QUESTIONS]
    runs = {
        "unpruned": _result([True, True, True, False], (LV, LV)),
        "unpruned-sft": _result([True, True, False, False], (LV, LV)),
        "atp": _result([True, False, True, False], (6, 3), branch=True),
        "uniform": _result([True, False, False, False], (8, 8), scene=False),
    }
    monkeypatch.setattr(evaluate, "run_method", lambda model, processor, samples, **kw: runs[model.method])
    monkeypatch.setattr(evaluate, "prompt_inputs", lambda model, processor, samples: len(samples))

    def times(entries, batch, **kw):  # per entry: 3 repeats of prefill and decode seconds
        return [
            {"prefill": [0.01 * batch * (i + 1) * f for f in (1.0, 1.1, 0.95)], "decode": [0.002 * (i + 2)] * 3}
            for i in range(len(entries))
        ]

    monkeypatch.setattr(evaluate, "time_interleaved", times)
    ev = evaluate.Evaluator(samples, batch_size=2, max_new_tokens=2, timing_batch=2, timing_repeats=3, decode_tokens=2)
    for method, budget, pruning, describe in (
        ("unpruned", None, "none", None),
        ("unpruned-sft", None, "none", None),
        ("atp", 0.5, "atp", {"name": "atp", "layers": [2, 4], "target_tokens": 8.0}),
        ("uniform", 0.5, "none", {"name": "uniform", "differs": "every k-th token"}),
    ):
        ev.add(method, budget, SimpleNamespace(method=method, config=_config(pruning)), None, describe=describe)
    ev.time_all(None)
    return ev.records


def _json(records) -> list[dict]:
    """The report.json entries, eval_seconds (measured) set to 0.0."""
    out = [r.to_json() for r in records]
    for r in out:
        assert isinstance(r["eval_seconds"], float)
        r["eval_seconds"] = 0.0  # keeps its place in the key order
    return out


def test_records_write_what_the_dicts_did(monkeypatch):
    recs = _json(evaluate_stand_ins(monkeypatch))
    assert [list(r.items()) for r in recs] == [list(r.items()) for r in OLD_RECORDS]  # key order too


def test_record_round_trip_and_attributes(monkeypatch):
    from pipeline.eval.records import Record

    unpruned, sft, atp, uniform = evaluate_stand_ins(monkeypatch)
    for rec in (unpruned, sft, atp, uniform):
        back = Record.from_json(rec.to_json())
        assert back == rec and list(back.to_json()) == list(rec.to_json())
    assert atp.retention == pytest.approx(2 / 3) and atp.retention_vs_sft == pytest.approx(1.0)
    assert atp.kept_at_atp_layers_by_family == {"coarse": [6.0, 3.0], "fine": [6.0, 3.0]}
    assert (
        atp.timing["2"]["prefill_ratio"]["ratio"] == pytest.approx(3.0)
        and atp.prefill_ms_ratio_b1 == atp.prefill_ms_ratio
    )
    assert atp.kept_by_branch is not None and uniform.kept_by_branch is None and uniform.object_recall is None
    # absent, not null: the reference's own retention and ratios, a scene's diagnostics without scenes
    assert not {"retention", "retention_by_family", "flops_exact_ratio", "prefill_ms_ratio"} & set(unpruned.to_json())
    assert not {"object_recall", "kept_by_branch"} & set(uniform.to_json())
    assert "retention_vs_sft" not in sft.to_json()  # the sft reference itself


def test_a_reference_that_scored_zero_gives_null_retention():
    """retention is written as null (not left out) when there is a reference but it scored 0; the
    FLOPs ratios are still there."""
    from pipeline.eval.report import record

    samples = [SimpleNamespace(family=f, qtype=q) for f, q in QUESTIONS]
    ref = record("unpruned", None, _result([False] * 4, (LV, LV)), samples, _config("none"), None)
    rec = record("uniform", 0.5, _result([True] * 4, (8, 8)), samples, _config("none"), ref).to_json()
    assert rec["retention"] is None and rec["retention_by_family"] == {"coarse": None, "fine": None}
    assert list(rec)[list(rec).index("describe") + 1 :] == [
        "retention",
        "retention_by_family",
        "flops_paper_ratio",
        "flops_exact_ratio",
        "kv_cache_bytes_ratio",
    ]


def test_older_report_files_read_back_unchanged():
    """Records of earlier report.json files: keys this schema lacks are kept (`extra`), keys that
    were not written yet stay absent; a key every record has is required."""
    from pipeline.eval.records import Record

    old = {k: v for k, v in OLD_RECORDS[2].items() if k not in ("timing", "n_bar_spread", "rank_corr_n_bar_shapes")}
    old |= {"timing_batch": 8, "timing_repeats": 5}
    rec = Record.from_json(old)
    assert rec.extra == {"timing_batch": 8, "timing_repeats": 5} and rec.timing is None and rec.n_bar_spread is None
    assert rec.to_json() == old
    with pytest.raises(TypeError, match="accuracy"):
        Record.from_json({k: v for k, v in old.items() if k != "accuracy"})


# `evaluate_stand_ins` run on the code before `Record` (commit 03cebff, which returned these dicts),
# eval_seconds set to 0.0 as `_json` does
OLD_RECORDS = json.loads((Path(__file__).parent / "test_records_before.json").read_text())
