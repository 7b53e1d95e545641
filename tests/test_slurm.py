"""slurm/ on a real single-node SLURM cluster (slurmctld, slurmd, munged; no mocks).

The session fixture installs the Debian packages (slurm/local-cluster/install.sh), starts
a cluster in a temp dir on free ports and always stops it by PID. Jobs are submitted with
slurm/train.sbatch exactly as a user would and run the real pipeline (`-m pipeline`), 2 CPU
tasks, gloo, DeepSpeed ZeRO-3, on the tiny config of tests/tiny_pipeline.py (LLaVA-format
parts and synthetic shards built by the session). The uninterrupted reference job runs
`run` (projector -> sft); the interrupted ones start from a copy of its projector output
and run `stage sft`, so all of them train the same model from the same start.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tiny_pipeline import BATCH, ENV, SAMPLES, build

# Generous limits: on the shared 2-core machine a niced job start can take minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster"
# DeepSpeed JIT-builds its CPU communication op into torch's extension cache, which every
# venv of the user shares: two venvs (a CI copy beside the checkout) rebuild it for each
# other, for minutes, inside the jobs. One cache per interpreter, built by the fixture.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "torch_extensions" / f"py-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"
)
JOB_ENV = {**ENV, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": EXTENSIONS}


@dataclass(frozen=True)
class Trainer:
    steps: int = 16  # optimizer steps, 2 epochs of the tiny data at 2 ranks
    save_every: int = 4
    ckpt_subdir: str = "sft/checkpoints"  # DeepSpeed save_dir inside run_dir, has `latest`
    metrics: str = "sft/metrics.jsonl"  # one line per step (truncated on resume)
    tb_subdir: str = "tb"  # TensorBoard dir inside run_dir, scalar per step
    loss_tag: str = "loss/total"

    @property
    def overrides(self) -> tuple:
        per_epoch = SAMPLES // (2 * BATCH)  # steps per epoch at 2 ranks
        return (
            "stages=[projector,sft]",
            f"train.max_steps={self.steps}",
            f"train.epochs={-(-self.steps // per_epoch)}",
            f"train.checkpoint_every={self.save_every}",
        )


# The real pipeline (launch.sh's default entry `-m pipeline`) on tests/tiny_pipeline.py's
# config. A step takes about 0.5 s on the 2 shared cores (seconds when starved), 12 steps
# after the first checkpoint: time enough to signal it mid-run without slowing it down.
TRAINER = Trainer()


# ------------------------------------------------------------------ the local cluster


def _alive(pid: int) -> bool:
    try:  # PID 1 here may not reap: a killed daemon can linger as a zombie
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _free_port() -> int:
    from pipeline.core.distributed import free_port

    return free_port()


@dataclass
class LocalCluster:
    dir: Path
    pids: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.dir / "etc" / "slurm.conf"))

    def start(self):
        # a random first job id: jobs' MASTER_PORTs (15000 + id % 20000) then differ from those of
        # another test session's cluster on this machine
        env = dict(
            os.environ,
            ATP_SLURM_CTLD_PORT=str(_free_port()),
            ATP_SLURM_D_PORT=str(_free_port()),
            ATP_SLURM_FIRST_JOB_ID=str(random.randrange(1, 19000)),
        )
        try:
            subprocess.run([CLUSTER / "start.sh", self.dir], env=env, check=True, timeout=120)
        finally:  # record the PIDs even if start.sh failed halfway: stop() kills them
            for d in ("munged", "slurmctld", "slurmd"):
                f = self.dir / "run" / f"{d}.pid"
                if f.exists():
                    self.pids[d] = int(f.read_text())

    def stop(self):
        subprocess.run([CLUSTER / "stop.sh", self.dir], timeout=120, capture_output=True)
        # belt and braces, by PID: the daemons recorded at start, and the slurmstepd of a job
        # step still running (stop.sh waits 10 s for the jobs; a starved job takes longer)
        leftovers = [*self.pids.values(), *self._stepds()]
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while any(map(_alive, leftovers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, leftovers)), f"still running: {self.pids}, stepd {self._stepds()}"

    def _stepds(self) -> list:
        """slurmstepd processes of this cluster (SLURM_CONF in their environment)."""
        conf = f"SLURM_CONF={self.dir / 'etc' / 'slurm.conf'}".encode()
        out = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if (p / "comm").read_text().strip() == "slurmstepd" and conf in (p / "environ").read_bytes().split(
                    b"\0"
                ):
                    out.append(int(p.name))
            except OSError:  # gone meanwhile
                pass
        return [pid for pid in out if _alive(pid)]

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def _require_cluster_machine():
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("SLURM tests need Linux and root (daemons run as SlurmUser=root)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM tests need the slurm packages or apt-get to install them")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    _require_cluster_machine()
    subprocess.run([CLUSTER / "install.sh"], check=True, timeout=600)
    # DeepSpeed's CPU backend JIT-builds a C++ op on first use (about a minute, once per
    # machine and interpreter); build it here rather than inside the first job's timing.
    subprocess.run(
        [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
        env=JOB_ENV,
        check=True,
        timeout=600,
        capture_output=True,
    )
    with LocalCluster(tmp_path_factory.mktemp("slurm")) as c:  # stop() runs even on failure
        yield c


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Tiny LLaVA-format parts, synthetic shards and their config (tests/tiny_pipeline.py)."""
    return build(tmp_path_factory.mktemp("tiny"))["config"]


# ------------------------------------------------------------------ jobs


def submit(cluster, config, run_dir: Path, *overrides, command=("stage", "sft")) -> str:
    """`sbatch slurm/train.sbatch COMMAND CONFIG OVERRIDES run_dir=RUN_DIR`, 2 tasks."""
    env = {**JOB_ENV, "SLURM_CONF": cluster.env["SLURM_CONF"], "ATP_PYTHON": sys.executable}
    env.pop("ATP_ENTRY", None)  # launch.sh's default: -m pipeline
    args = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={run_dir.parent}/{run_dir.name}-batch-%j.log",
        "slurm/train.sbatch",
        *command,
        str(config),
        *TRAINER.overrides,
        *overrides,
        f"run_dir={run_dir}",
    ]
    out = subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]


def job(cluster, jid) -> dict:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", jid], env=cluster.env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def wait_job(cluster, jid, run_dir, timeout=600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = job(cluster, jid)
        if j["JobState"] in FINAL:
            return j
        time.sleep(0.5)
    pytest.fail(f"job {jid} not done in {timeout}s: {j}\n{job_log(run_dir, jid)}")


def job_log(run_dir, jid) -> str:
    f = Path(run_dir) / "logs" / f"slurm-{jid}.log"
    # errors="replace": srun --label can split tqdm's multi-byte bar characters
    return f.read_text(errors="replace") if f.exists() else f"(no {f})"


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if v := pred():
            return v
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


# ------------------------------------------------------------------ run artefacts


def latest_tag(run_dir):
    f = Path(run_dir) / TRAINER.ckpt_subdir / "latest"
    return f.read_text().strip() if f.exists() else None


def tag_step(tag) -> int:
    return int(re.search(r"(\d+)$", tag).group(1))


def final_params(run_dir) -> dict:
    """Full fp32 weights of `latest` (DeepSpeed's zero_to_fp32 over every rank's shards)."""
    from pipeline.train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(Path(run_dir) / TRAINER.ckpt_subdir)


def metric_steps(run_dir) -> list:
    """Steps of metrics.jsonl, every line as written (a resume truncates it to its checkpoint)."""
    f = Path(run_dir) / TRAINER.metrics
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line]


def logged_steps(run_dir) -> list:
    """(step, wall_time) of every logged loss, over all event files (one per attempt),
    raw: a step logged twice (by an attempt and again by its resume) shows twice."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted((Path(run_dir) / TRAINER.tb_subdir).glob("events.out.tfevents.*")):
        out += [
            (e.step, e.wall_time)
            for e in EventFileLoader(str(f)).Load()
            for v in e.summary.value
            if v.tag == TRAINER.loss_tag
        ]
    return out


def assert_same_params(a, b):
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def report(capsys, msg):
    with capsys.disabled():
        print(f"\n[slurm timing] {msg}")


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def reference(cluster, tiny_config, tmp_path_factory):
    """An uninterrupted run: test 1, and the parameters the interrupted runs must match."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    jid = submit(cluster, tiny_config, run_dir, command=("run",))
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
    assert latest_tag(run_dir) == tag_for(TRAINER.steps)
    assert metric_steps(run_dir) == list(range(1, TRAINER.steps + 1))
    assert [s for s, _ in logged_steps(run_dir)] == list(range(1, TRAINER.steps + 1))
    mem = json.loads((run_dir / "sft" / "memory_rank1.json").read_text())
    assert mem["zero_stage"] == 3 and mem["param_bytes_this_rank"] < 0.6 * mem["param_bytes_full_model"]
    assert final_params(run_dir)
    assert "tasks=2" in log and "srun exit 0" in log


def test_preempt_usr1_saves_requeues_resumes(cluster, tiny_config, reference, tmp_path, capsys):
    run_dir = start_from_reference(reference, tmp_path / "preempted")
    jid = submit(cluster, tiny_config, run_dir)
    wait_for(lambda: latest_tag(run_dir), 420, "the first periodic checkpoint")
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR1", jid], env=cluster.env, check=True)
    # The marker is written after the preemption checkpoint is complete (it may be the
    # periodic one just saved, when USR1 lands before that step's stop check).
    wait_for(lambda: (run_dir / ".preempted").exists(), 60, "the preemption checkpoint and marker")
    t_saved = time.time()
    saved = latest_tag(run_dir)
    j = wait_job(cluster, jid, run_dir)
    log = job_log(run_dir, jid)
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "stage sft: stopped on SIGUSR1" in log and "preempted: scontrol requeue" in log
    assert "resumed from" in log
    assert (run_dir / "sft" / "DONE").exists() and not (run_dir / ".preempted").exists()

    steps = logged_steps(run_dir)
    assert [s for s, _ in steps] == list(range(1, TRAINER.steps + 1)), "a step repeated or skipped (TB)"
    assert metric_steps(run_dir) == list(range(1, TRAINER.steps + 1)), "a step repeated or skipped (metrics)"
    assert_same_params(final_params(run_dir), final_params(reference[0]))

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
    jid = submit(cluster, tiny_config, run_dir)
    wait_for(lambda: latest_tag(run_dir), 420, "the first periodic checkpoint")
    time.sleep(0.7)  # a step or two past the periodic checkpoint
    subprocess.run(["scancel", jid], env=cluster.env, check=True)
    j = wait_job(cluster, jid, run_dir)
    assert j["JobState"] == "CANCELLED"

    tag = latest_tag(run_dir)
    done = max(s for s, _ in logged_steps(run_dir))
    lost = done - tag_step(tag)
    report(capsys, f"scancel (SIGTERM) after step {done}: latest={tag}, steps lost {lost}")
    assert lost == 0, "SIGTERM: the ranks save after the step they stop at"
    assert "stage sft: stopped on SIGTERM" in job_log(run_dir, jid)
    assert not (run_dir / ".preempted").exists()  # no requeue on a plain scancel
    final_params(run_dir)  # `latest` is whole: every rank's shards load

    # The same command again resumes and ends where an uninterrupted run ends.
    jid2 = submit(cluster, tiny_config, run_dir)
    j2 = wait_job(cluster, jid2, run_dir)
    assert (j2["JobState"], j2["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir, jid2)
    assert "resumed from" in job_log(run_dir, jid2)
    assert [s for s, _ in logged_steps(run_dir)] == list(range(1, TRAINER.steps + 1))
    assert metric_steps(run_dir) == list(range(1, TRAINER.steps + 1))
    assert_same_params(final_params(run_dir), final_params(reference[0]))


def test_cluster_stopped_by_pid_when_a_test_fails(cluster, tmp_path):
    """What the session fixture relies on: leaving the `with` by an exception (a failing
    test) still stops every daemon by the PID it had at start. A second cluster, own ports."""
    c = LocalCluster(tmp_path / "second")
    with pytest.raises(RuntimeError, match="test failed"):
        with c:
            assert set(c.pids) == {"munged", "slurmctld", "slurmd"}
            assert all(map(_alive, c.pids.values()))
            raise RuntimeError("test failed")
    assert not any(map(_alive, c.pids.values()))
