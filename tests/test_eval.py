"""The main job, shrunk: base from scratch -> projector -> ATP sft -> export -> variants ->
eval, one process, a 4-layer model on 64 px images (16 visual tokens), then the report's
schema and that its numbers are measured, not constants. Also `python -m pipeline eval`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ["atp", "fixed", "fastv", "prumerge", "prumerge+", "sparsevlm", "visionzip", "uniform", "random"]
BUDGETS = [0.5, 0.3]  # 4 layers, ATP from layer 1: N_bar >= Lv / 4
LV = 16
FIELDS = [
    "method",
    "budget",
    "accuracy",
    "accuracy_by_family",
    "accuracy_by_qtype",
    "n_bar",
    "n_bar_share",
    "tokens_per_layer",
    "tokens_per_layer_by_family",
    "flops_paper",
    "flops_exact",
    "kv_cache_bytes",
    "prefill_ms",
    "decode_ms_per_token",
    "describe",
]
RATIOS = ["retention", "flops_exact_ratio", "kv_cache_bytes_ratio", "prefill_ms_ratio", "decode_ms_per_token_ratio"]

TINY = [
    "synthetic.train_samples=64",
    "synthetic.eval_samples=24",
    "synthetic.image_size=64",
    "synthetic.maxcount=32",
    "model.scratch.patch_size=16",
    "model.scratch.vision_hidden_size=32",
    "model.scratch.vision_layers=1",
    "model.scratch.vision_heads=2",
    "model.scratch.vision_intermediate_size=64",
    "model.scratch.hidden_size=32",
    "model.scratch.num_layers=4",
    "model.scratch.num_heads=2",
    "model.scratch.num_kv_heads=2",
    "model.scratch.intermediate_size=64",
    "base.weights=null",
    "base.train_samples=32",
    "base.overrides.train.max_steps=3",
    "base.overrides.data.batch_size=8",
    "base.overrides.data.num_workers=0",
    "atp.atp_layers=[1,2,3]",
    "atp.target_tokens=8",
    "atp.threshold_hidden=8",
    "atp.spatial_strides=[2]",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    f"eval.budgets={BUDGETS}",
    "eval.limit=16",
    "eval.timing_repeats=1",
    "eval.decode_tokens=2",
    "eval.batch_size=8",
    "eval.overlay_images=2",
    "eval.variant_overrides.train.max_steps=1",
]


def _run(args, timeout=900):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("main") / "run"
    _run(["run", "pipeline/configs/default.yaml", f"run_dir={run_dir}", *TINY])
    return run_dir


def test_report_schema_and_measured_numbers(main_job):
    report = json.loads((main_job / "eval" / "report.json").read_text())
    recs = report["records"]
    by = {(r["method"], r["budget"]): r for r in recs}
    assert set(by) == {("unpruned", None), ("unpruned-sft", None)} | {(m, b) for m in METHODS for b in BUDGETS}
    ref, sft = by[("unpruned", None)], by[("unpruned-sft", None)]
    assert sft["n_bar"] == pytest.approx(LV) and report["summary"]["unpruned_sft_accuracy"] == sft["accuracy"]
    assert ref["n_bar"] == pytest.approx(LV)
    for r in recs:
        for f in FIELDS:
            assert f in r, (r["method"], f)
        assert 0 <= r["accuracy"] <= 1
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert set(r["accuracy_by_family"]) <= {"coarse", "fine"}
        if r["method"] == "unpruned":
            continue
        # the second reference: the unpruned model after the same sft recipe
        assert r["retention_vs_sft"] == pytest.approx(r["accuracy"] / sft["accuracy"]) if sft["accuracy"] else True
        if r["method"] == "unpruned-sft":
            continue
        for f in RATIOS:
            assert f in r, (r["method"], f)
        assert r["retention"] == pytest.approx(r["accuracy"] / ref["accuracy"]) if ref["accuracy"] else True
        # FLOPs and KV follow the tokens each method kept (computed, not copied from the reference)
        assert r["flops_exact_ratio"] < 1 and r["kv_cache_bytes_ratio"] < 1
        assert r["n_bar"] == pytest.approx(sum(r["tokens_per_layer"]) / len(r["tokens_per_layer"]))
        if r["method"] not in ("atp",):  # budgets are matched by construction; ATP's is learned
            assert abs(r["n_bar"] - r["budget"] * LV) <= 1.0, (r["method"], r["budget"], r["n_bar"])
    # smaller budget -> fewer FLOPs for the policies
    for m in METHODS[1:]:
        assert by[(m, 0.3)]["flops_exact"] < by[(m, 0.5)]["flops_exact"], m
    atp = by[("atp", 0.5)]
    assert set(atp["kept_at_atp_layers_by_family"]) and all(
        len(v) == 3 for v in atp["kept_at_atp_layers_by_family"].values()
    )
    # where the kept tokens sit: recall never rises along the pruning points, nothing pruned keeps all
    assert ref["object_recall"] == 1.0 and 0 < ref["background_share"] < 1
    for r in recs:
        assert set(r["n_bar_by_qtype"]) == set(r["accuracy_by_qtype"]), r["method"]
        points = r["object_recall_per_point"]
        assert points == sorted(points, reverse=True) and 0 <= r["object_recall"] == points[-1] <= 1, r["method"]
        assert 0 <= r["small_recall"] <= 1 and 0 <= r["background_share"] <= 1
    assert len(atp["object_recall_per_point"]) == 3 and atp["object_recall"] < 1
    # hard ATP: the tokens each branch kept add up to the kept tokens after each module
    kept = [sum(v[k] for v in atp["kept_by_branch"].values()) for k in range(3)]
    assert kept == pytest.approx([atp["tokens_per_layer"][i] for i in atp["describe"]["layers"]])
    assert report["summary"]["budgets"]["0.5"]["best_training_free"] in METHODS[2:]
    # adaptivity in every report: per-image spread, the correlation with the scene's shapes
    assert atp["n_bar_spread"]["p10"] <= atp["n_bar_spread"]["p90"]
    assert "rank_corr_n_bar_shapes" in atp and "n_bar_spread_std" in report["summary"]["budgets"]["0.5"]
    assert report["meta"]["prior_accuracy"]["all"] >= 0
    for png in ("accuracy_vs_nbar.png", "kept_tokens_per_layer.png", "kept_tokens_overlay.png"):
        assert (main_job / "eval" / png).stat().st_size > 1000, png
    md = (main_job / "eval" / "report.md").read_text()
    assert all(f"| {m} |" in md for m in [*METHODS, "unpruned-sft"])
    assert "## Adaptivity" in md and "| atp - fixed |" in md


def test_base_parts_and_variants(main_job):
    for part in ("llama/config.json", "clip/config.json", "mm_projector.bin"):
        assert (main_job / "base" / part).exists(), part
    # the base scored itself against its bar on the same eval questions as the eval stage
    base_model = json.loads((main_job / "base" / "model" / "config.json").read_text())
    assert base_model["pruning"] == "none"
    base_report = json.loads((main_job / "base" / "eval" / "report.json").read_text())
    assert [(r["method"], r["budget"]) for r in base_report["records"]] == [("unpruned", None), ("random", 0.3)]
    goals = base_report["summary"]["base"]
    assert {"coarse", "fine", "qtype_margin_over_prior", "every_qtype_above_prior", "random_drop", "met"} <= set(goals)
    main_ref = json.loads((main_job / "eval" / "report.json").read_text())["records"][0]
    assert base_report["records"][0]["accuracy_by_qtype"] == main_ref["accuracy_by_qtype"]
    names = sorted(p.name for p in (main_job / "variants").iterdir() if p.is_dir())
    assert names == ["atp-30", "fixed-30", "fixed-50", "unpruned-sft"]  # atp-50 is the main sft (target 8 of 16)
    reference = json.loads((main_job / "variants" / "unpruned-sft" / "export" / "config.json").read_text())
    assert reference["pruning"] == "none"
    # the same recipe and steps as the pruned variants
    steps = [
        json.loads(line)["step"] for line in (main_job / "variants" / "unpruned-sft" / "sft" / "metrics.jsonl").open()
    ]
    assert max(steps) == 1
    fixed = json.loads((main_job / "variants" / "fixed-30" / "export" / "config.json").read_text())
    assert fixed["pruning"] == "fixed" and len(fixed["fixed_counts"]) == 3


def test_eval_cli_on_an_export(main_job, tmp_path):
    """`pipeline eval` on an export, once in the checkpoint's own (padded) hard layout and once with
    `--hard-layout packed`: the same records but for the timings, and the report names its layout."""
    reports = {}
    for layout in ("padded", "packed"):
        args = ["eval", "--checkpoint", str(main_job / "export"), "--shards", str(main_job / "shards" / "eval")]
        args += ["--out", str(tmp_path / layout), "--methods", "atp", "uniform", "--budgets", "0.5"]
        args += ["--limit", "8", "--timing-repeats", "1"] + (["--hard-layout", "packed"] if layout == "packed" else [])
        _run(args)
        reports[layout] = json.loads((tmp_path / layout / "report.json").read_text())
        assert reports[layout]["meta"]["hard_layout"] == layout
    assert "padded hard layout" in (tmp_path / "padded" / "report.md").read_text()
    assert "packed hard layout" in (tmp_path / "packed" / "report.md").read_text()
    padded, packed = (reports[k]["records"] for k in ("padded", "packed"))
    assert [(r["method"], r["budget"]) for r in padded] == [("unpruned", None), ("atp", 0.5), ("uniform", 0.5)]
    for a, b in zip(padded, packed):
        for key in ("accuracy", "accuracy_by_qtype", "n_bar", "tokens_per_layer", "flops_exact"):
            assert a[key] == pytest.approx(b[key]), (a["method"], key)


def test_eval_cli_refuses_methods_that_have_no_model(main_job, tmp_path):
    """A `fixed` export asked for `atp` only: nothing but the unpruned row could be evaluated, so the
    CLI says which method the checkpoint is and exits 2 instead of writing that report."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    args = ["eval", "--checkpoint", str(main_job / "variants" / "fixed-30" / "export")]
    args += ["--shards", str(main_job / "shards" / "eval"), "--out", str(tmp_path / "o"), "--methods", "atp"]
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "'fixed' checkpoint" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "o" / "report.json").exists()


def _rec(method="unpruned", budget=None, coarse=0.0, fine=0.0, qtypes=None, **fields):
    """A Record with the given accuracies and `fields`, placeholders for the rest."""
    from pipeline.eval.records import Record

    placeholders = dict(
        budget_tokens=None, accuracy=0.0, n_bar=None, n_bar_share=None, tokens_per_layer=[],
        tokens_per_layer_by_family={}, kept_at_atp_layers_by_family={},
        flops_paper=0.0, flops_exact=0.0, kv_cache_bytes=0.0, atp_flops=0.0, samples=0, describe={},
    )  # fmt: skip
    accuracies = dict(accuracy_by_family={"coarse": coarse, "fine": fine}, accuracy_by_qtype=qtypes or {})
    return Record(method=method, budget=budget, **accuracies | placeholders | fields)


def test_base_goals():
    from pipeline.stages.base import base_goals

    prior = {"qtype": {"background": 0.3, "count_total": 0.25}}
    good = [
        _rec("unpruned", None, 0.96, 0.86, {"background": 0.96, "count_total": 0.86}),
        _rec("random", 0.25, 0.95, 0.80, {}),
        _rec("random", 0.11, 0.93, 0.70, {}),
    ]
    g = base_goals(good, prior)
    assert g["met"] and g["random_budget"] == 0.11  # the smallest budget's drop counts
    assert g["random_drop"]["fine"] == pytest.approx(0.16) and g["discriminates"]
    assert g["qtype_margin_over_prior"]["count_total"] == pytest.approx(0.61)
    weak_fine = [_rec("unpruned", None, 0.96, 0.84, {"background": 0.96, "count_total": 0.84}), good[2]]
    assert not base_goals(weak_fine, prior)["met"]
    at_prior = [_rec("unpruned", None, 0.96, 0.86, {"background": 0.96, "count_total": 0.25}), good[2]]
    g = base_goals(at_prior, prior)
    assert not g["every_qtype_above_prior"] and not g["met"]
    no_discrimination = [good[0], _rec("random", 0.11, 0.90, 0.80, {})]  # fine loses 6 points only
    assert not base_goals(no_discrimination, prior)["met"]


def test_diagnostics_count_object_and_background_tokens():
    """Object recall and background share on a hand-made scene: a big square over the top-left
    quarter of a 4x4 grid, one small square in the bottom-right patch."""
    from pipeline.eval.diagnostics import Diagnostics
    from shards.objects import object_map

    scene = {
        "big": {"kind": "square", "box": [0, 0, 16, 16]},  # patches 0, 1, 4, 5 of a 32-px image
        "small": [{"kind": "square", "box": [25, 25, 31, 31]}],  # patch 15
    }
    keep = torch.zeros(2, 4 * 4, dtype=torch.bool)
    keep[0, [0, 1, 4, 15, 2, 3]] = True  # point 1: 3 of 4 big, the small one, 2 background
    keep[1, [0, 15, 2]] = True  # point 2: 1 big, the small one, 1 background
    branch = torch.zeros(2, 16, dtype=torch.int8)
    branch[0, [0, 1, 4, 15, 2, 3]] = torch.tensor([1, 1, 3, 2, 2, 1], dtype=torch.int8)
    branch[1, [0, 15, 2]] = torch.tensor([3, 1, 2], dtype=torch.int8)
    d = Diagnostics(grid=4, lv=16)
    labels = object_map(scene, 32, 4)
    d.add("cell_color", labels, torch.tensor([16.0, 6.0, 3.0]), keep=keep, branch=branch)
    d.add("cell_color", labels, torch.tensor([16.0, 16.0, 16.0]))  # the same image, unpruned
    s = d.summary()
    assert s["object_recall_per_point"] == pytest.approx([(4 + 5) / 10, (2 + 5) / 10])
    assert s["small_recall_per_point"] == pytest.approx([1.0, 1.0])
    assert s["background_share"] == pytest.approx((1 + 11) / (3 + 16))
    assert s["kept_by_branch"] == {"redundancy_only": [1.5, 0.5], "spatial_only": [1.0, 0.5], "both": [0.5, 0.5]}
    assert s["n_bar_by_qtype"] == {"cell_color": pytest.approx((25 / 3 + 16) / 2)}


def test_adaptivity_measures():
    """Per-image spread of N_bar, its rank correlation with the number of small shapes, and the
    report's ratios (fine / coarse, counting / background)."""
    from pipeline.eval.diagnostics import Diagnostics, spearman
    from pipeline.eval.report import adaptivity

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [5, 5, 9, 9]) == pytest.approx(1.0)  # ties share their rank
    assert spearman([1, 2, 3], [7, 7, 7]) is None
    d = Diagnostics(grid=4, lv=16)
    for tokens, shapes in ((4.0, 1), (8.0, 2), (6.0, 3), (12.0, 5)):
        d.add("count_total", None, torch.full((3,), tokens), n_shapes=shapes)
    s = d.summary()
    assert s["rank_corr_n_bar_shapes"] == pytest.approx(0.8)
    assert s["n_bar_spread"]["std"] == pytest.approx(torch.tensor([4.0, 8, 6, 12]).std(unbiased=False).item())
    by_family = {"coarse": [10.0, 10.0], "fine": [20.0, 10.0]}
    rec = _rec(
        **s | {"tokens_per_layer_by_family": by_family, "n_bar_by_qtype": {"background": 5.0, "count_total": 15.0}}
    )
    a = adaptivity(rec)
    assert a["fine_over_coarse_n_bar"] == pytest.approx(1.5) and a["count_over_background_n_bar"] == pytest.approx(3)
    assert a["rank_corr_n_bar_shapes"] == pytest.approx(0.8)


def test_one_budget_rule_and_method_registry():
    """A trained checkpoint is filed under the eval budget within 0.005 of its share, or none
    (the `variants`/`eval` stages and `python -m pipeline eval` share pipeline/eval/methods.py)."""
    from pipeline.eval.methods import ALL_METHODS, SFT_REFERENCE, kind, match_budget, variant_name

    assert match_budget(36 / 144, [0.25, 0.15, 0.11]) == 0.25
    assert match_budget(0.2, [0.25, 0.15, 0.11]) is None  # nearest is 0.005+ away: not filed
    assert match_budget(0.25, []) is None
    kinds = [kind(m) for m in ("unpruned", SFT_REFERENCE, "atp", "fastv")]
    assert kinds == ["reference", "reference", "trained", "policy"]
    assert variant_name("fixed", 0.11) == "fixed-11" and set(METHODS) == set(ALL_METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        kind("bogus")
