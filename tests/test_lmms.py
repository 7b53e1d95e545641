"""lmms-eval plugin (pipeline/eval/lmms/) on a tiny exported checkpoint, offline, CPU.

One module fixture builds a tiny ATP-LLaVA with the word tokenizer and saves it as the
export stage does (auto_map, modeling files, processor), converts 6 synthetic eval samples
into the local tasks `synthetic_vqa` / `synthetic_mc`, and writes 2-row stand-ins for the
seven offline benchmarks (their columns as the built-in tasks read them). One run of the
wrapper (`python -m pipeline.eval.lmms eval`, lmms-eval's own CLI and evaluator in a child
process) covers all nine tasks; the tests read that run and compare it with
`pipeline.eval.answers` computed directly on the same samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from pipeline.eval import answers  # noqa: E402
from pipeline.eval.lmms import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAYERS, LV, SAMPLES, MAX_NEW = 6, 16, 6, 3
PAPER7 = cli.GROUPS["paper7"]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def make_export(out: Path) -> None:
    """A random tiny ATP-LLaVA saved as pipeline/stages/export.py saves one."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration
    from pipeline.data.tokenizer import build_word_tokenizer
    from pipeline.train.build import make_processor

    from tiny_models import tiny_llava_config

    tok = build_word_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llava_config(
        layers=LAYERS,
        vocab=len(tok),
        image_token=tok.convert_tokens_to_ids("<image>"),
        max_positions=512,
        text=dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
    )
    model = AtpLlavaForConditionalGeneration.from_llava(
        LlavaForConditionalGeneration(cfg),
        atp_layers=[2, 4],
        target_tokens=LV * 0.5,
        threshold_hidden=32,
        spatial_strides=[2, 3],
    ).eval()
    AtpLlavaConfig.register_for_auto_class()
    AtpLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    make_processor(tok, image_processor, model.config).save_pretrained(out)


def _image(seed: int):
    from PIL import Image

    return Image.new("RGB", (40, 30 + seed), (40 * seed % 255, 200, 30))


def _parquet(path: Path, rows: list[dict], images=("image",)) -> None:
    from datasets import Dataset, Features, Image, Sequence

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_list(rows)
    feats = dict(ds.features)
    for col in images:
        feats[col] = Sequence(Image()) if isinstance(rows[0][col], list) else Image()
    ds.cast(Features(feats)).to_parquet(str(path))


def make_benchmark_standins(root: Path) -> None:
    """Two rows per benchmark with the columns lmms-eval's task functions read."""
    q = "is there a red shape?"
    _parquet(
        root / "gqa/testdev_balanced_instructions.parquet",
        [dict(id=f"q{i}", imageId=f"img{i}", question=q, answer="yes") for i in range(2)],
        images=(),
    )
    _parquet(root / "gqa/testdev_balanced_images.parquet", [dict(id=f"img{i}", image=_image(i)) for i in range(2)])
    _parquet(
        root / "mmbench/en_dev.parquet",
        [
            dict(
                index=i,
                question="which colour?",
                answer="A",
                hint=None,
                A="red",
                B="blue",
                C="green",
                D="gray",
                category="color",
                **{"L2-category": "attribute"},
                source="test",
                split="dev",
                image=_image(i),
            )
            for i in range(2)
        ],
    )
    _parquet(
        root / "mme/test.parquet",
        [
            dict(
                question_id="img0.png",
                question=q + " Please answer yes or no.",
                answer=a,
                category="existence",
                image=_image(0),
            )
            for a in ("Yes", "No")
        ],
    )
    _parquet(
        root / "pope/test.parquet",
        [
            dict(question_id=str(i), question=q, answer=a, category="adversarial", image=_image(i))
            for i, a in enumerate(("yes", "no"))
        ],
    )
    _parquet(
        root / "seedbench/test.parquet",
        [
            dict(
                question_id=str(i),
                question="which colour?",
                choice_a="red",
                choice_b="blue",
                choice_c="green",
                choice_d="gray",
                answer="A",
                data_type="image",
                image=[_image(i)],
            )
            for i in range(2)
        ],
    )
    _parquet(
        root / "scienceqa/img_test.parquet",
        [dict(hint="", question="which colour?", choices=["red", "blue"], answer=0, image=_image(i)) for i in range(2)],
    )
    _parquet(
        root / "vqav2/validation.parquet",
        [
            dict(
                question_id=i,
                question=q,
                image=_image(i),
                answers=[dict(answer="yes", answer_confidence="yes", answer_id=j) for j in range(10)],
            )
            for i in range(2)
        ],
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.eval.lmms.synthetic import convert
    from shards import synthetic

    root = tmp_path_factory.mktemp("lmms")
    make_export(root / "export")
    synthetic.write(str(root / "shards"), "eval", SAMPLES, 1, synthetic.Options(image_size=64, turns=1), progress=False)
    convert(root / "shards", root / "synthetic")
    make_benchmark_standins(root / "data")
    return root


def _lmms_eval(setup, tasks, include, out, extra, timeout):
    """`python -m pipeline.eval.lmms eval` on the export, in a child process, as a user runs it."""
    cmd = [sys.executable, "-m", "pipeline.eval.lmms", "eval", "--model-dir", setup / "export", "--tasks", tasks]
    cmd += ["--include-path", include, "--output", out, *extra]
    return subprocess.run(
        list(map(str, cmd)), cwd=setup, env=_env(setup), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def run(setup):
    """The wrapper over all nine tasks, in a child process, as a user runs it."""
    out = setup / "out"
    extra = [
        "--data-root",
        setup / "data",
        "--batch-size",
        "4",
        "--quiet",
        "--",
        "--gen_kwargs",
        f"max_new_tokens={MAX_NEW}",
    ]
    p = _lmms_eval(setup, "synthetic_vqa,synthetic_mc,paper7", setup / "synthetic", out, extra, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{(out / 'lmms_eval.log').read_text()[-6000:]}"
    results = [p for p in out.glob("*/*_results.json") if p.parent.name != "submissions"]
    assert len(results) == 1, results
    date_id = results[0].name[: -len("_results.json")]
    samples = {
        t: [json.loads(line) for line in results[0].with_name(f"{date_id}_samples_{t}.jsonl").open()]
        for t in ("synthetic_vqa", "synthetic_mc")
    }
    return dict(
        results=json.loads(results[0].read_text()),
        path=results[0],
        stdout=p.stdout,
        stats_path=results[0].with_name(f"{date_id}_{cli.STATS_NAME}"),
        samples=samples,
    )


@pytest.fixture(scope="module")
def direct(setup):
    """The same samples through pipeline.eval.answers, with the export loaded as the plugin loads it."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(setup / "export", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(setup / "export")
    docs = list(
        load_dataset(
            "parquet",
            data_files=str(setup / "synthetic" / "synthetic_eval.parquet"),
            split="train",
            cache_dir=str(setup / "hf_direct"),
        )
    )
    prompts = [answers.prompt_for(d["question"]) for d in docs]
    images = [d["image"].convert("RGB") for d in docs]
    gen_stats, mc_stats = answers.TokenStats(), answers.TokenStats()
    prefill = {}
    preds = answers.greedy_answers(
        model, processor, prompts, images, max_new_tokens=MAX_NEW, batch_size=4, stats=gen_stats, prefill=prefill
    )
    # several batches: every prompt has its own prefill record (pipeline/eval/diagnostics.py)
    assert len(prompts) > 4 and sorted(prefill) == list(range(len(prompts)))
    assert all(r["keep"] is not None and r["visual_tokens"].shape == (LAYERS,) for r in prefill.values())
    flat = [(i, c) for i, d in enumerate(docs) for c in d["choices"]]
    lls = answers.choice_loglikelihoods(
        model,
        processor,
        [prompts[i] for i, _ in flat],
        [images[i] for i, _ in flat],
        [" " + c for _, c in flat],
        batch_size=4,
        stats=mc_stats,
    )
    per_doc = [[ll for (j, _), (ll, _) in zip(flat, lls) if j == i] for i in range(len(docs))]
    return dict(docs=docs, preds=preds, lls=per_doc, gen_stats=gen_stats.summary(), mc_stats=mc_stats.summary())


# ------------------------------------------------------------------------------------- tests


def test_plugin_found_through_entry_point():
    from lmms_eval.models import get_model

    from pipeline.eval.lmms.model import AtpLlavaLmms

    assert get_model("atp_llava") is AtpLlavaLmms


def test_loglikelihood_survives_unwrap_generation_output():
    from lmms_eval.api.instance import unwrap_generation_output

    from pipeline.eval.lmms.model import _loglikelihood_output

    value, _ = unwrap_generation_output(_loglikelihood_output((-2.5, True)))
    assert value == (2.5, True) and isinstance(value, tuple)  # a negative log-likelihood, not a string


def test_generation_task_scores_equal_answers_module(run, direct):
    got = {s["doc_id"]: s for s in run["samples"]["synthetic_vqa"]}
    assert sorted(got) == list(range(SAMPLES))
    for i in range(len(direct["docs"])):
        resp = got[i]["filtered_resps"]  # lmms-eval logs a single response unwrapped
        assert (resp if isinstance(resp, str) else resp[0]) == direct["preds"][i], i
    want = sum(answers.is_correct(p, d["answer"]) for p, d in zip(direct["preds"], direct["docs"])) / SAMPLES
    assert run["results"]["results"]["synthetic_vqa"]["exact_match,none"] == pytest.approx(want)


def test_multiple_choice_task_scores_equal_answers_module(run, direct):
    got = {s["doc_id"]: s for s in run["samples"]["synthetic_mc"]}
    correct = 0
    for i, doc in enumerate(direct["docs"]):
        # (-log P, is_greedy) per choice, logged as strings; the plugin returns -log P (lmms-eval takes the argmin)
        nll = [float(r[0]) for r in got[i]["filtered_resps"]]
        assert nll == pytest.approx([-ll for ll in direct["lls"][i]], abs=1e-4), i
        best = max(range(len(doc["choices"])), key=lambda c: direct["lls"][i][c])
        correct += doc["choices"][best] == doc["answer"]
    assert run["results"]["results"]["synthetic_mc"]["acc,none"] == pytest.approx(correct / SAMPLES)


def test_token_statistics_written_beside_results(run, direct):
    stats = json.loads(run["stats_path"].read_text())
    assert stats["pruning"] == "atp" and stats["num_layers"] == LAYERS and stats["num_visual_tokens"] == LV
    vqa, mc = stats["tasks"]["synthetic_vqa"], stats["tasks"]["synthetic_mc"]
    assert vqa["image_samples"] == SAMPLES
    assert mc["image_samples"] == sum(len(d["choices"]) for d in direct["docs"])
    for task, want in ((vqa, direct["gen_stats"]), (mc, direct["mc_stats"])):
        per_layer = task["tokens_per_layer"]
        assert len(per_layer) == LAYERS and per_layer[:2] == [LV, LV]  # before the first ATP layer (2)
        assert per_layer[2] <= LV and per_layer[4] <= per_layer[2]  # pruned for real, cumulatively
        assert task["n_bar"] == pytest.approx(sum(per_layer) / LAYERS)
        assert task["n_bar"] == pytest.approx(want["n_bar"])
    assert set(PAPER7) <= set(stats["tasks"])
    assert "N_bar" in run["stdout"]


def test_seven_offline_benchmarks_run_from_local_copies(run):
    res = run["results"]["results"]
    for task in PAPER7:
        assert task in res, task
    assert "pope_accuracy,none" in res["pope_local"] and "mme_perception_score,none" in res["mme_local"]
    assert "seed_image,none" in res["seedbench_local"] and "gpt_eval_score,none" in res["mmbench_en_dev_local"]
    config = run["results"]["configs"]["gqa_local"]
    assert config["dataset_path"] == "parquet"


@pytest.mark.parametrize(
    "pruning,extra", [("none", {}), ("fixed", {"fixed_counts": "6/2"}), ("uniform", {"share": 0.5})]
)
def test_pruning_modes(setup, pruning, extra):
    from pipeline.eval.lmms.model import AtpLlavaLmms

    lm = AtpLlavaLmms(pretrained=str(setup / "export"), pruning=pruning, batch_size=2, **extra)
    stats = answers.TokenStats()
    answers.greedy_answers(
        lm.model,
        lm.processor,
        [answers.prompt_for("is there a red shape?")],
        [_image(1)],
        max_new_tokens=1,
        stats=stats,
    )
    per_layer = stats.summary()["tokens_per_layer"]
    assert lm.pruning == pruning
    if pruning == "none":
        assert per_layer == [LV] * LAYERS
    elif pruning == "fixed":
        assert per_layer == [LV, LV, 6, 6, 2, 2]
    else:
        assert stats.summary()["n_bar"] == pytest.approx(LV * 0.5, abs=1.5)
    with pytest.raises(ValueError, match="unknown model_args"):
        AtpLlavaLmms(pretrained=str(setup / "export"), pruning="none", bogus=1)


def test_offline_task_files_listed():
    tasks = cli.offline_tasks()
    assert sorted(tasks) == sorted(PAPER7)
    for info in tasks.values():
        assert info["files"] and info["make"] and all(f.startswith("data/") for f in info["files"])


def test_wrapper_fails_when_local_data_is_missing(tmp_path, setup, capsys):
    rc = cli.main(
        [
            "eval",
            "--model-dir",
            str(setup / "export"),
            "--tasks",
            "pope_local",
            "--data-root",
            str(tmp_path / "empty"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "pope_local: missing DATA_ROOT/pope/test.parquet" in err and "load_dataset(" in err


def test_check_results_reasons(tmp_path):
    with pytest.raises(cli.EvalFailed, match="no \\*_results.json"):
        cli.check_results(None, ["a"], "", 0)
    path = tmp_path / "x_results.json"
    path.write_text(json.dumps({"results": {"a": {"acc,none": 1.0}}}))
    assert cli.check_results(path, ["a"], "", 0)["results"]["a"]["acc,none"] == 1.0
    with pytest.raises(cli.EvalFailed, match="no results for tasks \\['b'\\]"):
        cli.check_results(path, ["a", "b"], "", 0)
    with pytest.raises(cli.EvalFailed, match="Error during evaluation"):
        cli.check_results(path, ["a"], "ERROR | Error during evaluation: boom", 0)
    with pytest.raises(cli.EvalFailed, match="status 3"):
        cli.check_results(path, ["a"], "", 3)


def test_wrapper_fails_loudly_when_a_task_errors(setup):
    """A task whose data file is gone: lmms-eval logs the error and exits 0; the wrapper exits 1."""
    broken = setup / "broken"
    broken.mkdir(exist_ok=True)
    text = (setup / "synthetic" / "synthetic_vqa.yaml").read_text()
    (broken / "broken_vqa.yaml").write_text(
        text.replace("task: synthetic_vqa", "task: broken_vqa").replace("synthetic_eval.parquet", "gone.parquet")
    )
    out = setup / "out_broken"
    p = _lmms_eval(setup, "broken_vqa", broken, out, ["--quiet"], timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "FAILED" in p.stderr and ("no *_results.json" in p.stderr or "broken_vqa" in p.stderr)
    assert "exited with status" not in p.stderr  # lmms-eval itself exited 0: the wrapper caught it
