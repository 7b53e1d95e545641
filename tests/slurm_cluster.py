"""A real local SLURM cluster for tests (slurm/local-cluster), and what tests read of its jobs.

Shared by tests/test_slurm.py (one node) and tests/test_slurm_nodes.py (two nodes, each in
its own network namespace). `LocalCluster` starts the cluster with start.sh and always
stops it by PID (and removes its namespaces); `submit` runs slurm/train.sbatch exactly as
a user would, with the real pipeline on the tiny config of tests/tiny_pipeline.py.
"""

from __future__ import annotations

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

from tiny_pipeline import BATCH, ENV, SAMPLES

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster"
# DeepSpeed JIT-builds its CPU communication op into torch's extension cache, which every
# venv of the user shares: two venvs (a CI copy beside the checkout) rebuild it for each
# other, for minutes, inside the jobs. One cache per interpreter, built by prepare_machine.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "torch_extensions" / f"py-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"
)
JOB_ENV = {**ENV, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": EXTENSIONS}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@dataclass(frozen=True)
class Trainer:
    """What a test job trains (stage sft of the tiny config) and where the run keeps it."""

    steps: int = 16  # optimizer steps
    save_every: int = 4
    ranks: int = 2  # the jobs' world size: sets steps per epoch
    ckpt_subdir: str = "sft/checkpoints"  # DeepSpeed save_dir inside run_dir, has `latest`
    metrics: str = "sft/metrics.jsonl"  # one line per step (truncated on resume)
    tb_subdir: str = "tb"  # TensorBoard dir inside run_dir, scalar per step
    loss_tag: str = "loss/total"

    @property
    def overrides(self) -> tuple:
        per_epoch = SAMPLES // (self.ranks * BATCH)
        return (
            "stages=[projector,sft]",
            f"train.max_steps={self.steps}",
            f"train.epochs={-(-self.steps // per_epoch)}",
            f"train.checkpoint_every={self.save_every}",
        )


# ------------------------------------------------------------------ the cluster


def alive(pid: int) -> bool:
    try:  # PID 1 here may not reap: a killed daemon can linger as a zombie
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def free_port() -> int:
    from pipeline.core.distributed import free_port

    return free_port()


@dataclass
class LocalCluster:
    dir: Path
    nodes: int = 1
    cpus: int = 4  # per node, for nodes > 1 (ATP_SLURM_CPUS); the nodes share this machine's cores
    pids: dict = field(default_factory=dict)
    netns: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.dir / "etc" / "slurm.conf"))
        if self.nodes > 1:  # clients reach slurmctld through the wrappers (node1's network)
            env["PATH"] = f"{self.dir / 'bin'}:{env['PATH']}"
        return env

    def start(self):
        # a random first job id: jobs' MASTER_PORTs (15000 + id % 20000) then differ from those of
        # another test session's cluster on this machine
        env = dict(
            os.environ,
            ATP_SLURM_CTLD_PORT=str(free_port()),
            ATP_SLURM_D_PORT=str(free_port()),
            ATP_SLURM_FIRST_JOB_ID=str(random.randrange(1, 19000)),
            ATP_SLURM_NODES=str(self.nodes),
            ATP_SLURM_CPUS=str(self.cpus),
        )
        try:
            subprocess.run([CLUSTER / "start.sh", self.dir], env=env, check=True, timeout=120)
        finally:  # record the PIDs and namespaces even if start.sh failed halfway: stop() ends them
            for f in (self.dir / "run").glob("*.pid"):
                self.pids[f.stem] = int(f.read_text())
            ns = self.dir / "etc" / "netns"
            self.netns = ns.read_text().split() if ns.exists() else []

    def stop(self):
        subprocess.run([CLUSTER / "stop.sh", self.dir], timeout=120, capture_output=True)
        # belt and braces, by PID: the daemons recorded at start, and the slurmstepd of a job
        # step still running (stop.sh waits 10 s for the jobs; a starved job takes longer)
        leftovers = [*self.pids.values(), *self._stepds()]
        for pid in leftovers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while any(map(alive, leftovers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, leftovers)), f"still running: {self.pids}, stepd {self._stepds()}"
        for n in self.netns:  # stop.sh deletes them; again here if it could not run
            if Path("/run/netns", n).exists():
                subprocess.run(["ip", "netns", "del", n], timeout=30, check=False)
        assert not [n for n in self.netns if Path("/run/netns", n).exists()], "a network namespace is left"

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
        return [pid for pid in out if alive(pid)]

    def task_pids(self, node: int, job: str) -> list:
        """PIDs of job `job`'s tasks (the pipeline's processes) on node `node` (1-based)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns[node - 1]], capture_output=True, text=True)
        pids = []
        for pid in map(int, out.stdout.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if b"pipeline" in cmdline and f"SLURM_JOB_ID={job}".encode() in environ and alive(pid):
                pids.append(pid)
        return pids

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def prepare_machine() -> None:
    """Skip unless this machine can run the cluster; install the packages; build DeepSpeed's
    CPU communication op (about a minute, once per machine and interpreter) here rather
    than inside the first job's timing."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("SLURM tests need Linux and root (daemons run as SlurmUser=root)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM tests need the slurm packages or apt-get to install them")
    subprocess.run([CLUSTER / "install.sh"], check=True, timeout=600)
    subprocess.run(
        [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
        env=JOB_ENV,
        check=True,
        timeout=600,
        capture_output=True,
    )


# ------------------------------------------------------------------ jobs


def submit(
    cluster, config, run_dir: Path, *overrides, trainer: Trainer, command=("stage", "sft"), nodes=1, per_node=2
) -> str:
    """`sbatch --nodes=N --ntasks-per-node=T slurm/train.sbatch COMMAND CONFIG OVERRIDES run_dir=RUN_DIR`."""
    cl = cluster.env
    env = {**JOB_ENV, "SLURM_CONF": cl["SLURM_CONF"], "PATH": cl["PATH"], "ATP_PYTHON": sys.executable}
    env.pop("ATP_ENTRY", None)  # launch.sh's default: -m pipeline
    args = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        "--cpus-per-task=1",
        f"--output={run_dir.parent}/{run_dir.name}-batch-%j.log",
        "slurm/train.sbatch",
        *command,
        str(config),
        *trainer.overrides,
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


def latest_tag(run_dir, trainer: Trainer):
    f = Path(run_dir) / trainer.ckpt_subdir / "latest"
    return f.read_text().strip() if f.exists() else None


def tag_step(tag) -> int:
    return int(re.search(r"(\d+)$", tag).group(1))


def final_params(run_dir, trainer: Trainer) -> dict:
    """Full fp32 weights of `latest` (DeepSpeed's zero_to_fp32 over every rank's shards)."""
    from pipeline.train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(Path(run_dir) / trainer.ckpt_subdir)


def metrics(run_dir, trainer: Trainer) -> list:
    """metrics.jsonl, every line as written (a resume truncates it to its checkpoint)."""
    f = Path(run_dir) / trainer.metrics
    return [json.loads(line) for line in f.read_text().splitlines() if line]


def metric_steps(run_dir, trainer: Trainer) -> list:
    return [m["step"] for m in metrics(run_dir, trainer)]


def logged_steps(run_dir, trainer: Trainer) -> list:
    """(step, wall_time) of every logged loss, over all event files (one per attempt),
    raw: a step logged twice (by an attempt and again by its resume) shows twice."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted((Path(run_dir) / trainer.tb_subdir).glob("events.out.tfevents.*")):
        out += [
            (e.step, e.wall_time)
            for e in EventFileLoader(str(f)).Load()
            for v in e.summary.value
            if v.tag == trainer.loss_tag
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
