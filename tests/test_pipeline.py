"""The staged pipeline under 2-process DeepSpeed ZeRO-3 on CPU (gloo, fp32), tiny parts.

One session fixture builds LLaVA-1.5-style parts (a Llama dir with the word tokenizer, a
CLIP dir, `mm_projector.bin` in LLaVA's key names) and tiny synthetic shards
(tests/tiny_pipeline.py, shared with tests/test_slurm.py), then runs
projector -> sft -> export once under `torchrun --nproc_per_node 2`; the tests read that
run and start further runs from its projector output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from tiny_pipeline import ENV, LAYERS, LV, REPO, STEPS, build, launch


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def zero3_run(tiny):
    """projector -> sft -> export under 2-process ZeRO-3: the run the other tests compare to."""
    from pipeline.core.distributed import free_port

    # DeepSpeed names its CPU all-reduce files .._{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}: a fixed
    # port picks out this run's own files, whatever other DeepSpeed runs share the machine
    port = free_port()
    launch(["run", tiny["config"]], master_port=port)
    tiny["shm_left"] = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    return tiny["root"] / "run"


def fresh_run(tiny, name: str, stages: str = "[sft]") -> Path:
    """A run dir that starts from the ZeRO-3 run's (complete) projector output."""
    run = tiny["root"] / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(tiny["root"] / "run" / "projector", run / "projector")
    return run


def consolidated(run: Path) -> dict:
    from pipeline.train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(run / "sft" / "checkpoints")


# ------------------------------------------------------------------------------------- tests


def test_zero3_pipeline_end_to_end(zero3_run, tiny):
    assert not tiny["shm_left"]  # DeepSpeed's CPU all-reduce files are unlinked (distributed.py)
    for stage in ("projector", "sft", "export"):
        assert (zero3_run / stage / "DONE").exists()
    metrics = [json.loads(line) for line in (zero3_run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for key in (
        "loss/total",
        "loss/ntp",
        "loss/atp",
        "loss/target",
        "atp/n_bar",
        "atp/kept/module1",
        "atp/theta_r/module0/min",
        "atp/theta_s/module1/max",
        "lr/lm",
        "lr/atp",
        "perf/samples_per_s",
    ):
        assert key in metrics[-1], key
    assert metrics[0]["lr/atp"] == pytest.approx(10 * metrics[0]["lr/lm"])  # separate groups
    assert list((zero3_run / "tb").glob("events.out.tfevents.*"))
    assert (zero3_run / "config.yaml").exists()
    mem = [json.loads((zero3_run / "sft" / f"memory_rank{r}.json").read_text()) for r in (0, 1)]
    assert mem[0]["zero_stage"] == 3
    assert mem[0]["param_bytes_this_rank"] < 0.6 * mem[0]["param_bytes_full_model"]  # partitioned
    export = zero3_run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "atp_llava" and config["atp_layers"] == [1, 3]
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_atp_llava.")
    assert (export / "model.safetensors").exists() and (export / "modeling_atp_llava.py").exists()


LOAD_EXPORT = """
import sys
sys.path.append(sys.argv[1])  # site-packages only: no .pth files, so no editable finder
try:
    import model
except ImportError:
    pass
else:
    raise SystemExit("the repo is importable: the test would prove nothing")
import json, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
proc = AutoProcessor.from_pretrained(sys.argv[2])
assert type(m).__module__.startswith("transformers_modules."), type(m).__module__
inputs = proc(images=Image.new("RGB", (40, 40), (200, 30, 30)),
              text="USER: <image>\\nwhat color is the big shape? ASSISTANT:", return_tensors="pt")
with torch.no_grad():
    out = m(**inputs)
    gen = m.generate(**inputs, max_new_tokens=4, do_sample=False)
print(json.dumps({"visual_tokens": out.visual_tokens[0].tolist(),
                  "new_tokens": gen.shape[1] - inputs["input_ids"].shape[1],
                  "image_tokens": int((inputs["input_ids"] == m.config.image_token_id).sum())}))
"""


def test_export_loads_without_the_repo(zero3_run, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOAD_EXPORT)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    # -S: no site processing, so the editable install's path hook never loads; cwd is not the repo
    p = subprocess.run(
        [sys.executable, "-S", str(script), sysconfig.get_paths()["purelib"], str(zero3_run / "export")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["image_tokens"] == LV
    assert res["new_tokens"] >= 1
    vt = res["visual_tokens"]
    assert vt[0] == LV and len(vt) == LAYERS
    assert all(v == int(v) for v in vt)  # hard pruning: whole tokens, not soft sums


def test_projector_zero3_loading_matches_plain(zero3_run, tiny):
    """The 2-rank ZeRO-3 projector stage loaded every part as a plain (no ZeRO) load does."""
    from model import AtpLlavaForConditionalGeneration

    parts = tiny["parts"]
    zero3 = AtpLlavaForConditionalGeneration.from_pretrained(zero3_run / "projector").eval()
    plain = AtpLlavaForConditionalGeneration.from_parts(
        parts["llama"],
        parts["clip"],
        parts["mm_projector"],
        atp_layers=[1, 3],
        threshold_hidden=32,
        spatial_strides=[2, 3],
        target_tokens=LV * 0.5,
    ).eval()
    x = torch.randn(3, LV, 32, generator=torch.Generator().manual_seed(1))
    raw = torch.load(parts["mm_projector"], weights_only=True)
    ref = torch.nn.functional.linear(
        torch.nn.functional.gelu(
            torch.nn.functional.linear(x, raw["model.mm_projector.0.weight"], raw["model.mm_projector.0.bias"])
        ),
        raw["model.mm_projector.2.weight"],
        raw["model.mm_projector.2.bias"],
    )
    with torch.no_grad():
        out_zero3 = zero3.model.multi_modal_projector(x)
        out_plain = plain.model.multi_modal_projector(x)
    torch.testing.assert_close(out_zero3, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(out_zero3, ref, rtol=1e-6, atol=1e-6)
    # and the Llama / CLIP weights: every non-ATP tensor equal
    plain_sd = plain.state_dict()
    for key, value in zero3.state_dict().items():
        if not key.startswith("atp_modules."):
            torch.testing.assert_close(value, plain_sd[key], rtol=0, atol=0, msg=key)


def test_resume_after_sigkill_matches_uninterrupted(zero3_run, tiny):
    """Rank 1 SIGKILLs itself after step 3 (checkpoint at 2); the rerun resumes from step 2
    and ends with the uninterrupted run's per-step losses and parameters."""
    run = fresh_run(tiny, "resume")
    args = ["run", tiny["config"], f"run_dir={run}", "stages=[sft]"]
    crashed = launch([*args, "train.crash_at_step=3"], check=False)
    assert crashed.returncode != 0
    assert (run / "sft" / "checkpoints" / "latest").read_text() == "step00000002"
    assert not (run / "sft" / "DONE").exists()
    resumed = launch(args)
    assert "resumed from" in resumed.stderr
    from pipeline.train.monitor import read_metrics

    a, b = read_metrics(zero3_run / "sft" / "metrics.jsonl"), read_metrics(run / "sft" / "metrics.jsonl")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss/total", "loss/ntp", "loss/atp", "loss/target", "atp/n_bar"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
    sa, sb = consolidated(zero3_run), consolidated(run)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-6, atol=1e-7, msg=key)


def test_budget_losses_pull_n_bar_to_target(zero3_run, tiny):
    """Started near 60% of Lv (the projector's analytic threshold init for a 50% target, no
    calibration), trained
    with a 25% target, LM frozen (lr 0): N_bar ends within 10% of the target on the
    training data (mean of the last 10 steps). T = 10: at Lv = 16 the default T = 50
    saturates the masks and the thresholds' gradient vanishes once all tokens are gone."""
    run = fresh_run(tiny, "budget")
    target = LV * 0.25
    launch(
        [
            "run",
            tiny["config"],
            f"run_dir={run}",
            "stages=[sft]",
            f"atp.target_tokens={target}",
            "atp.mask_temperature=10",
            "atp.lambda_target=1.0",
            "train.lr_lm=0",
            "train.lr_atp=1e-2",
            "train.calibrate_thresholds=false",  # keep the far-off analytic start
            "train.epochs=4",
            "train.max_steps=60",
            "train.checkpoint_every=100",
        ],
        nproc=1,
    )
    from pipeline.train.monitor import read_metrics

    m = read_metrics(run / "sft" / "metrics.jsonl")
    first = m[1]["atp/n_bar"]
    last = sum(m[s]["atp/n_bar"] for s in sorted(m)[-10:]) / 10
    assert first > LV * 0.5  # it really started far from the target
    assert abs(last - target) <= 0.1 * target, (first, last, target)


def test_sigusr1_on_one_rank_saves_and_exits_zero(zero3_run, tiny):
    """SIGUSR1 to rank 1 only: both ranks agree after the step, save, leave `.preempted`
    (training is not finished) and exit 0."""
    run = fresh_run(tiny, "signal")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipeline",
        "run",
        str(tiny["config"]),
        f"run_dir={run}",
        "stages=[sft]",
        "train.epochs=50",
        "train.max_steps=200",
        "train.checkpoint_every=1000",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "sft" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    rank1 = next(pid for pid in workers if _environ(pid).get("RANK") == "1")
    os.kill(rank1, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped on SIGUSR1" in out
    tag = (run / "sft" / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 2 <= step < 200
    assert (run / ".preempted").exists() and not (run / "sft" / "DONE").exists()


def _children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


def _environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_pruning_point_before_layer0_trains_under_zero3(tiny):
    """atp_layers [0, 3]: module 0's scores come from layer 0's own attention on the embeddings,
    run outside the decoder loop; under 2-rank ZeRO-3 its weights are gathered by calling the
    modules, the thresholds of module 0 train, and the export prunes before layer 0 (after
    calibrating its budget)."""
    from model import AtpLlavaForConditionalGeneration

    run = tiny["root"] / "layer0"
    common = ["atp.atp_layers=[0,3]", "train.max_steps=3", "train.checkpoint_every=100", "train.lr_atp=1e-2"]
    # and the export meets the budget on 8 training prompts (model/calibration.py calibrate_budget)
    p = launch(
        ["run", tiny["config"], f"run_dir={run}", "stages=[projector,sft,export]", *common, "export.calibrate_budget=8"]
    )
    assert "budget calibrated on 8 prompts" in p.stdout + p.stderr
    before = AtpLlavaForConditionalGeneration.from_pretrained(run / "projector").atp_modules[0].head_r.weight
    m = AtpLlavaForConditionalGeneration.from_pretrained(run / "export")
    assert m.config.atp_layers == [0, 3]
    assert not torch.equal(m.atp_modules[0].head_r.weight, before)  # module 0's thresholds were trained
    from pipeline.eval.evaluate import load_model
    from pipeline.eval.samples import load_samples, prompt_inputs

    model, proc = load_model(run / "export")
    with torch.no_grad():
        out = model(**prompt_inputs(model, proc, load_samples(str(tiny["root"] / "shards"), limit=4)))
    assert out.visual_tokens[:, 0].max() < LV  # layer 0 already sees the pruned image


def test_annealed_mask_temperature_follows_the_step_and_resumes(zero3_run, tiny):
    """train.mask_temperature_end: T goes 20 -> 2 geometrically over 4 steps; the first step
    equals a constant-T run's and later soft counts differ from it (the forward reads the
    annealed T); a run killed after step 3 (checkpoint at 2) resumes on the same schedule
    and loss curve."""
    from pipeline.train.monitor import read_metrics

    def sft(name, *extra, check=True):
        run = fresh_run(tiny, name)
        args = ["run", tiny["config"], f"run_dir={run}", "stages=[sft]", "atp.mask_temperature=20"]
        p = launch([*args, "train.max_steps=4", "train.checkpoint_every=2", *extra], nproc=1, check=check)
        return run, args, p

    annealed, _, _ = sft("anneal", "train.mask_temperature_end=2")
    constant, _, _ = sft("constant")
    a, c = read_metrics(annealed / "sft" / "metrics.jsonl"), read_metrics(constant / "sft" / "metrics.jsonl")
    temps = [a[s]["atp/mask_temperature"] for s in (1, 2, 3, 4)]
    assert temps == pytest.approx([20 * 0.1 ** (i / 3) for i in range(4)], rel=1e-9)
    assert "atp/mask_temperature" not in c[1]
    assert a[1]["loss/total"] == c[1]["loss/total"] and a[1]["atp/n_bar"] == c[1]["atp/n_bar"]
    assert a[4]["atp/n_bar"] != pytest.approx(c[4]["atp/n_bar"], rel=1e-4)

    run, args, crashed = sft(
        "anneal-resume", "train.mask_temperature_end=2", "train.crash_at_step=3", "train.crash_rank=0", check=False
    )
    assert crashed.returncode != 0
    launch([*args, "train.max_steps=4", "train.checkpoint_every=2", "train.mask_temperature_end=2"], nproc=1)
    r = read_metrics(run / "sft" / "metrics.jsonl")
    assert sorted(r) == [1, 2, 3, 4]
    for step in r:
        for key in ("atp/mask_temperature", "loss/total", "atp/n_bar"):
            assert r[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
