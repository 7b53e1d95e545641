"""slurm/ on a real single-node SLURM cluster (slurmctld, slurmd, munged; no mocks).

The session fixture installs the Debian packages (slurm/local-cluster/install.sh), starts
a cluster in a temp dir on free ports and always stops it by PID. Jobs are submitted with
slurm/train.sbatch exactly as a user would and run the real pipeline (`-m pipeline`), 2 CPU
tasks, gloo, DeepSpeed ZeRO-3, on the tiny config of tests/tiny_pipeline.py (LLaVA-format
parts and synthetic shards built by the session). The uninterrupted reference job runs
`run` (projector -> sft); the interrupted ones start from a copy of its projector output
and run `stage sft`, so all of them train the same model from the same start.
"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import (
    LocalCluster,
    Trainer,
    alive,
    assert_same_params,
    final_params,
    job_log,
    latest_tag,
    logged_steps,
    metric_steps,
    prepare_machine,
    report,
    submit,
    tag_step,
    wait_for,
    wait_job,
)

from tiny_pipeline import build

# Generous limits: on the shared 2-core machine a niced job start can take minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

# The real pipeline (launch.sh's default entry `-m pipeline`) on tests/tiny_pipeline.py's
# config, 2 tasks: 16 steps, 2 epochs of the tiny data. A step takes about 0.5 s on the 2
# shared cores (seconds when starved), 12 steps after the first checkpoint: time enough to
# signal it mid-run without slowing it down.
TRAINER = Trainer(steps=16, save_every=4, ranks=2)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    prepare_machine()
    with LocalCluster(tmp_path_factory.mktemp("slurm")) as c:  # stop() runs even on failure
        yield c


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Tiny LLaVA-format parts, synthetic shards and their config (tests/tiny_pipeline.py)."""
    return build(tmp_path_factory.mktemp("tiny"))["config"]


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def reference(cluster, tiny_config, tmp_path_factory):
    """An uninterrupted run: test 1, and the parameters the interrupted runs must match."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    jid = submit(cluster, tiny_config, run_dir, command=("run",), trainer=TRAINER)
    return run_dir, jid, wait_job(cluster, jid, run_dir)


def start_from_reference(reference, run_dir: Path) -> Path:
    """A run dir holding the reference run's complete projector output: `stage sft` there
    trains what the reference trained."""
    shutil.copytree(reference[0] / "projector", run_dir / "projector")
    return run_dir


def test_train_job_completes(cluster, reference):
    from pipeline.train.checkpoint import tag_for

    run_dir, jid, j = reference
    log = job_log(run_dir, jid)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert (run_dir / "projector" / "DONE").exists() and (run_dir / "sft" / "DONE").exists()
    assert latest_tag(run_dir, TRAINER) == tag_for(TRAINER.steps)
    assert metric_steps(run_dir, TRAINER) == list(range(1, TRAINER.steps + 1))
    assert [s for s, _ in logged_steps(run_dir, TRAINER)] == list(range(1, TRAINER.steps + 1))
    mem = json.loads((run_dir / "sft" / "memory_rank1.json").read_text())
    assert mem["zero_stage"] == 3 and mem["param_bytes_this_rank"] < 0.6 * mem["param_bytes_full_model"]
    assert final_params(run_dir, TRAINER)
    assert "tasks=2" in log and "srun exit 0" in log


def test_preempt_usr1_saves_requeues_resumes(cluster, tiny_config, reference, tmp_path, capsys):
    run_dir = start_from_reference(reference, tmp_path / "preempted")
    jid = submit(cluster, tiny_config, run_dir, trainer=TRAINER)
    wait_for(lambda: latest_tag(run_dir, TRAINER), 420, "the first periodic checkpoint")
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR1", jid], env=cluster.env, check=True)
    # The marker is written after the preemption checkpoint is complete (it may be the
    # periodic one just saved, when USR1 lands before that step's stop check).
    wait_for(lambda: (run_dir / ".preempted").exists(), 60, "the preemption checkpoint and marker")
    t_saved = time.time()
    saved = latest_tag(run_dir, TRAINER)
    j = wait_job(cluster, jid, run_dir)
    log = job_log(run_dir, jid)
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "stage sft: stopped on SIGUSR1" in log and "preempted: scontrol requeue" in log
    assert "resumed from" in log
    assert (run_dir / "sft" / "DONE").exists() and not (run_dir / ".preempted").exists()

    steps = logged_steps(run_dir, TRAINER)
    assert [s for s, _ in steps] == list(range(1, TRAINER.steps + 1)), "a step repeated or skipped (TB)"
    assert metric_steps(run_dir, TRAINER) == list(range(1, TRAINER.steps + 1)), "a step repeated or skipped (metrics)"
    assert_same_params(final_params(run_dir, TRAINER), final_params(reference[0], TRAINER))

    k = tag_step(saved)
    t_requeue = float(re.search(r"^(\S+) preempted: scontrol requeue", log, re.M).group(1))
    t_restart = float(re.search(r"^(\S+) start: .* restart=1", log, re.M).group(1))
    t_resumed = dict(steps)[k + 1]
    report(
        capsys,
        f"USR1 -> checkpoint step{k} saved: {t_saved - t_sig:.2f}s; "
        f"requeue -> job restarted: {t_restart - t_requeue:.1f}s; "
        f"requeue -> first resumed step ({k + 1}): {t_resumed - t_requeue:.1f}s",
    )


def test_scancel_sigterm_keeps_latest_whole(cluster, tiny_config, reference, tmp_path, capsys):
    run_dir = start_from_reference(reference, tmp_path / "cancelled")
    jid = submit(cluster, tiny_config, run_dir, trainer=TRAINER)
    wait_for(lambda: latest_tag(run_dir, TRAINER), 420, "the first periodic checkpoint")
    time.sleep(0.7)  # a step or two past the periodic checkpoint
    subprocess.run(["scancel", jid], env=cluster.env, check=True)
    j = wait_job(cluster, jid, run_dir)
    assert j["JobState"] == "CANCELLED"

    tag = latest_tag(run_dir, TRAINER)
    done = max(s for s, _ in logged_steps(run_dir, TRAINER))
    lost = done - tag_step(tag)
    report(capsys, f"scancel (SIGTERM) after step {done}: latest={tag}, steps lost {lost}")
    assert lost == 0, "SIGTERM: the ranks save after the step they stop at"
    assert "stage sft: stopped on SIGTERM" in job_log(run_dir, jid)
    assert not (run_dir / ".preempted").exists()  # no requeue on a plain scancel
    final_params(run_dir, TRAINER)  # `latest` is whole: every rank's shards load

    # The same command again resumes and ends where an uninterrupted run ends.
    jid2 = submit(cluster, tiny_config, run_dir, trainer=TRAINER)
    j2 = wait_job(cluster, jid2, run_dir)
    assert (j2["JobState"], j2["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir, jid2)
    assert "resumed from" in job_log(run_dir, jid2)
    assert [s for s, _ in logged_steps(run_dir, TRAINER)] == list(range(1, TRAINER.steps + 1))
    assert metric_steps(run_dir, TRAINER) == list(range(1, TRAINER.steps + 1))
    assert_same_params(final_params(run_dir, TRAINER), final_params(reference[0], TRAINER))


def test_cluster_stopped_by_pid_when_a_test_fails(cluster, tmp_path):
    """What the session fixture relies on: leaving the `with` by an exception (a failing
    test) still stops every daemon by the PID it had at start. A second cluster, own ports."""
    c = LocalCluster(tmp_path / "second")
    with pytest.raises(RuntimeError, match="test failed"):
        with c:
            assert set(c.pids) == {"munged", "slurmctld", "slurmd"}
            assert all(map(alive, c.pids.values()))
            raise RuntimeError("test failed")
    assert not any(map(alive, c.pids.values()))
