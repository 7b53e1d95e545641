"""slurm/ on a real single-node SLURM cluster (slurmctld, slurmd, munged; no mocks).

The session fixture installs the Debian packages (slurm/local-cluster/install.sh), starts
a cluster in a temp dir on free ports and always stops it by PID. Jobs are submitted with
slurm/train.sbatch exactly as a user would, 2 CPU tasks, gloo, DeepSpeed ZeRO-3.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster"


@dataclass(frozen=True)
class Trainer:
    entry: str                    # what follows the interpreter (launch.sh's ATP_ENTRY)
    config: str
    overrides: tuple = ()
    steps: int = 16               # total optimizer steps of that config
    save_every: int = 4
    ckpt_subdir: str = "checkpoints"   # DeepSpeed save_dir inside run_dir, has `latest`
    tb_subdir: str = "tb"              # TensorBoard dir inside run_dir, scalar per step
    loss_tag: str = "train/loss"


# TODO(pipeline): when `python -m pipeline stage sft` exists, replace this one definition:
#   TRAINER = Trainer(entry="-m pipeline", config="<the embedded default's tiny config>",
#                     overrides=("<max-steps key>=16", "<save-every key>=4"), ...)
# and align ckpt_subdir / tb_subdir / loss_tag with where the sft stage writes them.
TRAINER = Trainer(entry="tests/slurm_fixtures/train_stub.py", config="tests/slurm_fixtures/tiny.yaml",
                  overrides=("steps=16", "save_every=4", "step_sleep=0.3"))


# ------------------------------------------------------------------ the local cluster

def _alive(pid: int) -> bool:
    try:  # PID 1 here may not reap: a killed daemon can linger as a zombie
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _free_port() -> int:
    from pipeline.distributed import free_port
    return free_port()


@dataclass
class LocalCluster:
    dir: Path
    pids: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.dir / "etc" / "slurm.conf"))

    def start(self):
        env = dict(os.environ, ATP_SLURM_CTLD_PORT=str(_free_port()), ATP_SLURM_D_PORT=str(_free_port()))
        try:
            subprocess.run([CLUSTER / "start.sh", self.dir], env=env, check=True, timeout=120)
        finally:  # record the PIDs even if start.sh failed halfway: stop() kills them
            for d in ("munged", "slurmctld", "slurmd"):
                f = self.dir / "run" / f"{d}.pid"
                if f.exists():
                    self.pids[d] = int(f.read_text())

    def stop(self):
        subprocess.run([CLUSTER / "stop.sh", self.dir], timeout=120, capture_output=True)
        for pid in self.pids.values():  # belt and braces, by the PIDs recorded at start
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while any(map(_alive, self.pids.values())) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, self.pids.values())), f"daemons still running: {self.pids}"

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
    # machine); build it here rather than inside the first job's timing.
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=dict(os.environ, DS_ACCELERATOR="cpu"), check=True, timeout=600,
                   capture_output=True)
    with LocalCluster(tmp_path_factory.mktemp("slurm")) as c:  # stop() runs even on failure
        yield c


# ------------------------------------------------------------------ jobs

def submit(cluster, run_dir: Path, *overrides) -> str:
    env = dict(cluster.env, ATP_ENTRY=TRAINER.entry, ATP_PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    args = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
            f"--output={run_dir.parent}/{run_dir.name}-batch-%j.log",
            "slurm/train.sbatch", "stage", "sft", TRAINER.config, *TRAINER.overrides, *overrides,
            f"run_dir={run_dir}"]
    out = subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]


def job(cluster, jid) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", jid], env=cluster.env,
                         capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def wait_job(cluster, jid, run_dir, timeout=240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = job(cluster, jid)
        if j["JobState"] in FINAL:
            return j
        time.sleep(0.5)
    pytest.fail(f"job {jid} not done in {timeout}s: {j}\n{job_log(run_dir, jid)}")


def job_log(run_dir, jid) -> str:
    f = Path(run_dir) / "logs" / f"slurm-{jid}.log"
    return f.read_text() if f.exists() else f"(no {f})"


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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(Path(run_dir) / TRAINER.ckpt_subdir))


def logged_steps(run_dir) -> list:
    """(step, wall_time) of every logged loss, over all event files (one per attempt)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    out = []
    for f in sorted((Path(run_dir) / TRAINER.tb_subdir).glob("events.out.tfevents.*")):
        out += [(e.step, e.wall_time) for e in EventFileLoader(str(f)).Load()
                for v in e.summary.value if v.tag == TRAINER.loss_tag]
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
def reference(cluster, tmp_path_factory):
    """An uninterrupted run: test 1, and the parameters the interrupted runs must match."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    jid = submit(cluster, run_dir)
    return run_dir, jid, wait_job(cluster, jid, run_dir)


def test_train_job_completes(cluster, reference):
    run_dir, jid, j = reference
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir, jid)
    assert latest_tag(run_dir) == f"step{TRAINER.steps}"
    assert [s for s, _ in logged_steps(run_dir)] == list(range(1, TRAINER.steps + 1))
    assert final_params(run_dir)
    log = job_log(run_dir, jid)
    assert "tasks=2" in log and "srun exit 0" in log


def test_preempt_usr1_saves_requeues_resumes(cluster, reference, tmp_path, capsys):
    run_dir = tmp_path / "preempted"
    jid = submit(cluster, run_dir)
    first = wait_for(lambda: latest_tag(run_dir), 180, "the first periodic checkpoint")
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR1", jid], env=cluster.env, check=True)
    saved = wait_for(lambda: (t := latest_tag(run_dir)) != first and t, 60, "the preemption checkpoint")
    t_saved = time.time()
    j = wait_job(cluster, jid, run_dir)
    log = job_log(run_dir, jid)
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "preempted: scontrol requeue" in log

    steps = logged_steps(run_dir)
    assert [s for s, _ in steps] == list(range(1, TRAINER.steps + 1)), "a step repeated or skipped"
    assert_same_params(final_params(run_dir), final_params(reference[0]))

    k = tag_step(saved)
    t_requeue = float(re.search(r"^(\S+) preempted: scontrol requeue", log, re.M).group(1))
    t_restart = float(re.search(r"^(\S+) start: .* restart=1", log, re.M).group(1))
    t_resumed = dict(steps)[k + 1]
    report(capsys, f"USR1 -> checkpoint step{k} saved: {t_saved - t_sig:.2f}s; "
                   f"requeue -> job restarted: {t_restart - t_requeue:.1f}s; "
                   f"requeue -> first resumed step ({k + 1}): {t_resumed - t_requeue:.1f}s")


def test_scancel_sigterm_keeps_latest_whole(cluster, reference, tmp_path, capsys):
    run_dir = tmp_path / "cancelled"
    jid = submit(cluster, run_dir)
    wait_for(lambda: latest_tag(run_dir), 180, "the first periodic checkpoint")
    time.sleep(0.7)  # mid-way between two periodic checkpoints
    subprocess.run(["scancel", jid], env=cluster.env, check=True)
    j = wait_job(cluster, jid, run_dir)
    assert j["JobState"] == "CANCELLED"

    tag = latest_tag(run_dir)
    done = max(s for s, _ in logged_steps(run_dir))
    lost = done - tag_step(tag)
    report(capsys, f"scancel (SIGTERM) after step {done}: latest={tag}, steps lost {lost}")
    assert 0 <= lost < TRAINER.save_every
    final_params(run_dir)  # `latest` is whole: every rank's shards load

    # The same command again resumes and ends where an uninterrupted run ends.
    jid2 = submit(cluster, run_dir)
    j2 = wait_job(cluster, jid2, run_dir)
    assert (j2["JobState"], j2["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir, jid2)
    assert sorted({s for s, _ in logged_steps(run_dir)}) == list(range(1, TRAINER.steps + 1))
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
