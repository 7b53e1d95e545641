"""Crash safety and training faults on real single-process runs of the tiny pipeline
(tests/tiny_pipeline.py; DeepSpeed ZeRO-3 at world size 1 unless a test says otherwise):
checkpoints that lost `latest` or hold a truncated file, the run-directory lock, every
sample bad, a stop signal while the loader waits, NaN inputs, and non-finite weights at export.

One module fixture trains 6 steps with checkpoints at 2, 4, 6; each test works on a copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_pipeline import ENV, REPO, build, launch, reversed_roles_shard

CKPT = Path("sft") / "checkpoints"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = build(tmp_path_factory.mktemp("faults"))
    t["common"] = ["train.keep_checkpoints=3"]
    launch(["run", t["config"], "stages=[projector,sft]", *t["common"]], nproc=1)
    assert sorted(p.name for p in (t["root"] / "run" / CKPT).glob("step*")) == [
        "step00000002",
        "step00000004",
        "step00000006",
    ]
    return t


def copy_run(tiny, dest: Path, sft_done: bool = False) -> Path:
    shutil.copytree(tiny["root"] / "run", dest)
    if not sft_done:
        (dest / "sft" / "DONE").unlink()
    return dest


def sft(tiny, run: Path, *overrides, **kw):
    return launch(["run", tiny["config"], f"run_dir={run}", "stages=[sft]", *tiny["common"], *overrides], nproc=1, **kw)


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]


def tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / CKPT).iterdir() if p.is_dir())


# ------------------------------------------------------------------ checkpoints


def test_lost_latest_resumes_from_the_newest_complete_checkpoint(tiny, tmp_path):
    """Probe: with `latest` deleted the rerun started from step 0 and its first save deleted
    every newer checkpoint. Now it resumes from step 6 (found by its marker), keeps 4 and 6."""
    run = copy_run(tiny, tmp_path / "run")
    (run / CKPT / "latest").unlink()
    p = sft(tiny, run, "train.max_steps=8")
    assert f"resumed from {run / CKPT}/step00000006 at step 6" in p.stderr
    assert tags(run) == ["step00000004", "step00000006", "step00000008"]  # keep 3: step 2 pruned
    assert metric_steps(run) == list(range(1, 9))
    assert not (run / ".lock").exists()  # released at the end


def test_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous(tiny, tmp_path):
    """Probe: a truncated file in the newest tag stopped the resume with `OSError: [Errno 22]`,
    no file named. Now the file is named, its tag kept aside, and step 4 resumed."""
    run = copy_run(tiny, tmp_path / "run")
    victim = next((run / CKPT / "step00000006").glob("*optim_states.pt"))
    os.truncate(victim, victim.stat().st_size // 2)
    p = sft(tiny, run, "train.max_steps=8")
    assert str(victim) in p.stderr and "truncated" in p.stderr
    assert f"resumed from {run / CKPT}/step00000004 at step 4" in p.stderr
    assert tags(run) == ["step00000004", "step00000006", "step00000006.broken", "step00000008"]
    assert metric_steps(run) == list(range(1, 9))


def test_another_zero_stage_is_refused_and_nothing_renamed(tiny, tmp_path):
    """A ZeRO-3 run's checkpoints rerun at ZeRO-0: exit 2 naming both stages, every tag kept."""
    run = copy_run(tiny, tmp_path / "run")
    p = sft(tiny, run, "train.max_steps=8", "train.zero_stage=0", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"CheckpointMismatch: checkpoint {run / CKPT}/step00000006 was saved with another" in p.stderr
    assert "ZeRO stage 3 when saved, 0 now" in p.stderr and "nothing was renamed" in p.stderr
    assert tags(run) == ["step00000002", "step00000004", "step00000006"]
    assert metric_steps(run) == list(range(1, 7)) and not (run / ".lock").exists()


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    """The same 6 steps under 2-process ZeRO-3 (checkpoints at 2, 4, 6), from the fixture's projector."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    shutil.copytree(tiny["root"] / "run" / "projector", run / "projector")
    launch(["run", tiny["config"], f"run_dir={run}", "stages=[sft]", *tiny["common"]], nproc=2)
    return run


def test_a_two_rank_checkpoint_rerun_on_one_process_is_kept_and_resumes_on_two(tiny, two_ranks, tmp_path):
    """Probe: 2-rank ZeRO-3 checkpoints rerun with 1 process: DeepSpeed refused them ("used a DP
    world size of 2"), every one was renamed *.broken, and the rerun on 2 ranks restarted from
    step 0. Now the 1-process run (global batch 4 against the checkpoint's 8) exits 2 naming
    both, renames nothing, and 2 ranks resume from step 6 (tests/test_resume_world.py resumes
    on 1 and 4 ranks at the same global batch)."""
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    (run / "sft" / "DONE").unlink()
    p = sft(tiny, run, "train.max_steps=8", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"checkpoint {run / CKPT}/step00000006 was saved with another configuration" in p.stderr
    assert "global batch 8 when saved, 4 now" in p.stderr and "nothing was renamed" in p.stderr
    assert tags(run) == ["step00000002", "step00000004", "step00000006"] and not (run / ".lock").exists()
    p = launch(["run", tiny["config"], f"run_dir={run}", "stages=[sft]", *tiny["common"], "train.max_steps=8"])
    assert f"resumed from {run / CKPT}/step00000006 at step 6" in p.stderr
    assert tags(run) == ["step00000004", "step00000006", "step00000008"]
    assert metric_steps(run) == list(range(1, 9))


DISK_FILLS = """
import sys, torch
from pipeline.train import checkpoint
real_save = torch.save
def save(obj, f, *a, **k):  # what torch's writer raises on ENOSPC, for DeepSpeed's save of step 8
    if "step00000008" in str(f):
        raise RuntimeError("basic_ios::clear: iostream error")
    return real_save(obj, f, *a, **k)
torch.save = save
checkpoint._free_bytes = lambda path: 4096
from pipeline.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_full_during_a_save_is_named(tiny, tmp_path):
    """Probe: a disk that filled during a save ended the run with torch's bare "basic_ios::clear:
    iostream error". Through DeepSpeed's real save: exit 1, the tag, bytes needed and free named."""
    run = copy_run(tiny, tmp_path / "run")
    args = ["run", str(tiny["config"]), f"run_dir={run}", "stages=[sft]", *tiny["common"], "train.max_steps=8"]
    p = subprocess.run(
        [sys.executable, "-c", DISK_FILLS, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 1, p.stderr[-3000:]
    needed = sum(f.stat().st_size for f in (run / CKPT / "step00000006").iterdir())
    assert f"CheckpointDiskFull: no space left for checkpoint {run / CKPT}/step00000008: 4,096 bytes free" in p.stderr
    assert f"({needed:,} bytes) needed (the size of step00000006)" in p.stderr
    from pipeline.train import checkpoint

    assert checkpoint.resume_tag(run / CKPT) == "step00000006" and not (run / ".lock").exists()


# ------------------------------------------------------------------ run-directory lock


def test_a_second_run_on_a_locked_run_dir_is_refused(tiny, tmp_path):
    """Probe: two runs on one run_dir both exited 0, interleaving metrics.jsonl and config.yaml.
    Now the second one (this test process holds the lock, as a live first run would) exits 1
    naming the holder, before writing anything."""
    from pipeline.core.lock import RunDirLock

    run = copy_run(tiny, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "sft/metrics.jsonl")}
    lock = RunDirLock(run)
    lock.acquire()
    try:
        p = sft(tiny, run, "train.max_steps=8", check=False)
    finally:
        lock.release()
    assert p.returncode == 1, p.stderr[-3000:]
    assert "is in use by another run" in p.stderr and f"pid {os.getpid()}" in p.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    assert tags(run) == ["step00000002", "step00000004", "step00000006"]


def test_a_stale_lock_is_taken_over(tmp_path, caplog, monkeypatch):
    from pipeline.core.lock import LOCK, RunDirLock, RunDirLocked, _me

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK).write_text(json.dumps({**_me(), "pid": gone.pid, "start": "1"}))
    lock = RunDirLock(tmp_path)
    lock.acquire()  # its holder is not running: stale
    assert "taking the lock over" in caplog.text
    with pytest.raises(RunDirLocked, match="in use by another run"):
        RunDirLock(tmp_path).acquire()  # this process is alive
    lock.release()
    assert not (tmp_path / LOCK).exists()
    # another host: cannot be checked, unless it is this SLURM job's earlier attempt
    other = {**_me(), "host": "elsewhere", "slurm_job": "77", "slurm_restart": 0}
    (tmp_path / LOCK).write_text(json.dumps(other))
    with pytest.raises(RunDirLocked, match=f"delete {tmp_path / LOCK}"):
        RunDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunDirLock(tmp_path).acquire()


# ------------------------------------------------------------------ data faults


def test_every_sample_bad_stops_the_run_with_a_named_error(tiny, tmp_path):
    """Probe: 16 records with reversed roles: 20 skip warnings, then the loader spun forever.
    Now data.max_consecutive_bad (default 100) bad samples in a row stop it, rc 1."""
    run = copy_run(tiny, tmp_path / "run")
    shutil.rmtree(run / "sft")
    p = sft(tiny, run, f"data.shards={reversed_roles_shard(tmp_path / 'bad')}", check=False, timeout=120)
    assert p.returncode == 1
    assert "TooManyBadSamples: 100 bad samples in a row (data.max_consecutive_bad=100)" in p.stderr
    assert "bad_conversation" in p.stderr and not (run / ".lock").exists()


@pytest.mark.parametrize("calibrate", [True, False])
def test_sigterm_is_honoured_while_the_loader_waits(tiny, tmp_path, calibrate):
    """Probe: while the loader skipped bad samples, SIGTERM was ignored (kill -9 needed). Now a
    single process stops at once and exits 0, from the calibration batch (the default) or a
    step's first batch, the limit set out of reach."""
    run = copy_run(tiny, tmp_path / "run")
    shutil.rmtree(run / "sft")
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "pipeline", "run", str(tiny["config"]), f"run_dir={run}", "stages=[sft]"]
    cmd += [f"data.shards={reversed_roles_shard(tmp_path / 'bad')}", "data.max_consecutive_bad=1000000000"]
    cmd += [f"train.calibrate_thresholds={str(calibrate).lower()}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "further bad_conversation skips" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    assert time.time() - t0 < 30
    text = log.read_text()
    assert "SIGTERM while waiting for the" in text and "stopped on SIGTERM" in text
    assert not (run / "sft" / "DONE").exists() and not (run / ".lock").exists()


# ------------------------------------------------------------------ non-finite steps

NAN_INPUTS = """
import sys
import pipeline.train.trainer as trainer
which, calls, original = sys.argv[1], [0], trainer._model_inputs
def poisoned(batch, device, dtype):
    inputs = original(batch, device, dtype)
    calls[0] += 1
    if (which == "all" or str(calls[0]) in which.split(",")) and "pixel_values" in inputs:
        inputs["pixel_values"][0] = float("nan")
    return inputs
trainer._model_inputs = poisoned
from pipeline.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def run_with_nan(tiny, run: Path, which: str, *overrides):
    """The pipeline with NaN in the first image of micro-batches `which` (1-based, or "all")."""
    args = ["run", str(tiny["config"]), f"run_dir={run}", "train.calibrate_thresholds=false", *overrides]
    return subprocess.run(
        [sys.executable, "-c", NAN_INPUTS, which, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )


def schedule(total: int, lr: float) -> list[float]:
    """The lr of steps 1..total by pipeline.train.ds.lr_schedule (the tiny config's warmup 0.2)."""
    from pipeline.train.ds import lr_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = lr_schedule(SimpleNamespace(train=SimpleNamespace(warmup_ratio=0.2, min_lr_ratio=0.0)), total)(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("zero", [0, 3])
def test_a_nan_image_skips_its_step_and_counts_it(tiny, tmp_path, zero):
    """Probe: one NaN image under ZeRO-0 made the loss NaN to the end (rc 0, 91 of 130 exported
    tensors NaN); under ZeRO-3 DeepSpeed skipped the step uncounted and the LR schedule stalled.
    Now the step is skipped and counted in metrics.jsonl and TensorBoard at both stages, the
    schedule follows the step count, and the export is finite."""
    run = copy_run(tiny, tmp_path / "run")
    shutil.rmtree(run / "sft")
    shutil.rmtree(run / "tb")
    p = run_with_nan(tiny, run, "2", "stages=[sft,export]", f"train.zero_stage={zero}", "train.max_steps=4")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "step 2: non-finite loss or gradients, update skipped (1 in a row, 1 in all)" in p.stderr
    m = {r["step"]: r for r in map(json.loads, (run / "sft" / "metrics.jsonl").read_text().splitlines())}
    assert math.isnan(m[2]["loss/total"])
    assert [m[s]["train/step_skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert [m[s]["train/nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(math.isfinite(m[s]["loss/total"]) for s in (3, 4))
    assert [m[s]["lr/lm"] for s in (1, 2, 3, 4)] == pytest.approx(schedule(4, 1e-3))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/nonfinite_steps")] == [0, 1, 1, 1]
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(run / "export" / "model.safetensors").values())


def test_nonfinite_steps_in_a_row_stop_the_run(tiny, tmp_path):
    """Every image NaN (ZeRO-0): train.max_nonfinite_steps in a row stop the run, rc 1, no export."""
    run = copy_run(tiny, tmp_path / "run")
    shutil.rmtree(run / "sft")
    limits = ["train.max_nonfinite_steps=3", "train.max_steps=6"]
    p = run_with_nan(tiny, run, "all", "stages=[sft,export]", "train.zero_stage=0", *limits)
    assert p.returncode == 1
    assert "NonFiniteTraining: 3 optimizer steps in a row (to step 3)" in p.stderr
    assert metric_steps(run) == [1, 2, 3]
    assert not (run / "sft" / "DONE").exists() and not (run / "export").exists()


def test_export_refuses_nonfinite_weights(tiny, tmp_path, monkeypatch):
    """Probe: an export of NaN weights was written and marked DONE. Now it raises
    NonFiniteWeights, naming the count, and writes nothing."""
    from pipeline.core.config import load_config
    from pipeline.stages import export
    from pipeline.train import checkpoint

    run_dir = copy_run(tiny, tmp_path / "run", sft_done=True)
    real = checkpoint.consolidated_state_dict

    def with_nan(ckpt_dir):
        state = real(ckpt_dir)
        next(v for k, v in state.items() if k.startswith("atp_modules."))[0] = float("inf")
        return state

    monkeypatch.setattr(checkpoint, "consolidated_state_dict", with_nan)
    run = load_config(tiny["config"], [f"run_dir={run_dir}"])
    with pytest.raises(checkpoint.NonFiniteWeights, match=r"1 of \d+ tensors hold NaN or inf"):
        export.export(run, run_dir / "export")
    assert not (run_dir / "export").exists() and not (run_dir / "export.tmp").exists()
