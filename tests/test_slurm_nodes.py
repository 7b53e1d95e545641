"""slurm/train.sbatch across two real SLURM nodes on one machine (no mocks).

The module's cluster (slurm/local-cluster/start.sh, ATP_SLURM_NODES=2) runs node1 and node2
as slurmds in network, UTS and mount namespaces it creates: each node its own hostname,
address (10.213.0.1/2 on a private bridge, no route anywhere else), /etc/hosts and /dev/shm.
Jobs are submitted as a user would (`sbatch --nodes=2 --ntasks-per-node=2 slurm/train.sbatch`)
and train the real pipeline's sft stage with ZeRO-3 over gloo on 4 CPU ranks, tiny config
(tests/tiny_pipeline.py), 10 steps, from one projector output built once.

- the 2-node loss curve against a 1-node 4-rank run of the same global batch (per step
  within 1e-5 relative: fp32 reduction-order noise is all that may differ);
- `scancel --signal=USR1`: the job saves, requeues itself and ends with the uninterrupted
  2-node run's parameters bit for bit;
- node2's tasks killed mid-run: the job fails within 2 minutes naming the lost ranks, no
  rank is left running, nothing is deleted, and the same command resumes from the newest
  complete checkpoint to the uninterrupted run's parameters.
"""

import json
import os
import re
import shutil
import signal
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
    metric_steps,
    metrics,
    prepare_machine,
    report,
    submit,
    tag_step,
    wait_for,
    wait_job,
)

from tiny_pipeline import build, launch

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

# 4 ranks x 4 samples = 16 per step, 4 steps per epoch of the 64 tiny samples; a checkpoint
# every 2 steps leaves room to interrupt between two of them.
TRAINER = Trainer(steps=10, save_every=2, ranks=4)
STEPS = list(range(1, TRAINER.steps + 1))
LOST_WITHIN = 120  # seconds from the kill to the job's end


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    prepare_machine()
    # 8 CPUs a node: the two reference jobs (2 x 2 and 1 x 4 tasks) run side by side
    with LocalCluster(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus=8) as c:  # stop() runs even on failure
        yield c


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The tiny config and one projector output (a single process): every job starts from a
    copy of it, so all of them train the same model."""
    root = tmp_path_factory.mktemp("tiny2")
    config = build(root)["config"]
    launch(["stage", "projector", config, f"run_dir={root / 'start'}"], nproc=1)
    return config, root / "start" / "projector"


def new_run(start, run_dir: Path) -> Path:
    shutil.copytree(start[1], run_dir / "projector")
    return run_dir


class References:
    """Uninterrupted runs, submitted at once and run side by side with the tests' own jobs:
    2 nodes x 2 tasks, and 1 node x 4 tasks. `get(name)` waits for one: (run_dir, job id, job)."""

    def __init__(self, cluster, start, root: Path):
        self.cluster, self.t0, self.jobs, self.done = cluster, time.time(), {}, {}
        for name, nodes, per_node in (("two_nodes", 2, 2), ("one_node", 1, 4)):
            run_dir = new_run(start, root / name)
            self.jobs[name] = (
                run_dir,
                submit(cluster, start[0], run_dir, trainer=TRAINER, nodes=nodes, per_node=per_node),
            )

    def get(self, name: str) -> tuple:
        if name not in self.done:
            run_dir, jid = self.jobs[name]
            self.done[name] = (run_dir, jid, wait_job(self.cluster, jid, run_dir))
        return self.done[name]


@pytest.fixture(scope="module")
def references(cluster2, start, tmp_path_factory):
    return References(cluster2, start, tmp_path_factory.mktemp("refs"))


def losses(run_dir) -> list:
    return [m[TRAINER.loss_tag] for m in metrics(run_dir, TRAINER)]


def test_nodes_have_own_hostname_address_and_shm(cluster2, references):
    """What the training runs rely on: each node's tasks see their own hostname, address and
    /dev/shm, and no route leads out of the namespaces. (Requests `references` first, so
    those jobs start now.)"""
    probe = f"atp-probe-{os.getpid()}"
    out = subprocess.run(
        [
            "srun",
            "-N2",
            "--ntasks-per-node=1",
            "--label",
            "sh",
            "-c",
            f'touch /dev/shm/{probe}-$(hostname); echo "$(hostname) $(hostname -i) $(ls /dev/shm | grep -c {probe}) '
            f'$(ls /dev/shm/{probe}-*) $(ip route | grep -c default)"',
        ],
        env=cluster2.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = sorted(line.split(": ", 1)[1].split() for line in out.splitlines())
    assert rows == [
        ["node1", "10.213.0.1", "1", f"/dev/shm/{probe}-node1", "0"],
        ["node2", "10.213.0.2", "1", f"/dev/shm/{probe}-node2", "0"],
    ], out
    assert not list(Path("/dev/shm").glob(f"{probe}-*")), "a node wrote to this host's /dev/shm"


def test_usr1_requeues_and_resumes_bit_identically(cluster2, start, references, tmp_path, capsys):
    run_dir = new_run(start, tmp_path / "preempted")
    jid = submit(cluster2, start[0], run_dir, trainer=TRAINER, nodes=2, per_node=2)
    wait_for(lambda: latest_tag(run_dir, TRAINER), 600, "the first periodic checkpoint")
    t_sig = time.time()
    subprocess.run(["scancel", "--signal=USR1", jid], env=cluster2.env, check=True)
    wait_for(lambda: (run_dir / ".preempted").exists(), 120, "the preemption checkpoint and marker")
    t_saved = time.time()
    saved = latest_tag(run_dir, TRAINER)
    j = wait_job(cluster2, jid, run_dir)
    log = job_log(run_dir, jid)
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "stage sft: stopped on SIGUSR1" in log and "preempted: scontrol requeue" in log
    assert re.search(rf"resumed from \S*/{saved} at step {tag_step(saved)}", log), log
    assert log.count("start (world size 4: node1 ranks 0-1, node2 ranks 2-3)") == 2  # both attempts on 2 nodes
    assert metric_steps(run_dir, TRAINER) == STEPS, "a step repeated or skipped"
    ref = references.get("two_nodes")[0]
    assert losses(run_dir) == losses(ref)  # the same curve, bit for bit
    assert_same_params(final_params(run_dir, TRAINER), final_params(ref, TRAINER))
    report(
        capsys,
        f"2 nodes, USR1 -> {saved} saved: {t_saved - t_sig:.1f}s; signal -> resumed job done: "
        f"{time.time() - t_sig:.0f}s",
    )


def test_lost_node_fails_named_and_resubmission_resumes(cluster2, start, references, tmp_path, capsys):
    from pipeline.train.checkpoint import resume_tag

    run_dir = new_run(start, tmp_path / "lost")
    ckpts = run_dir / TRAINER.ckpt_subdir
    jid = submit(cluster2, start[0], run_dir, trainer=TRAINER, nodes=2, per_node=2)
    # mid-run: a step past a complete checkpoint
    wait_for(lambda: resume_tag(ckpts), 600, "the first complete checkpoint")
    first = tag_step(resume_tag(ckpts))
    wait_for(
        lambda: (run_dir / TRAINER.metrics).exists() and max(metric_steps(run_dir, TRAINER)) > first,
        300,
        "a step after the first checkpoint",
    )
    tasks = cluster2.task_pids(2, jid)
    assert len(tasks) == 2, tasks
    t_kill = time.time()
    for pid in tasks:  # node2's tasks die at once, as in a node failure
        os.kill(pid, signal.SIGKILL)
    before = {p.relative_to(run_dir) for p in run_dir.rglob("*")}
    newest = resume_tag(ckpts)

    j = wait_job(cluster2, jid, run_dir, timeout=LOST_WITHIN)
    t_end = time.time()
    log = job_log(run_dir, jid)
    assert j["JobState"] == "FAILED" and j["ExitCode"] != "0:0", (j, log)
    # a node1 rank names the lost ones (which of them reports first depends on the collective)
    assert re.search(
        r"error: PeerLost: rank [01] on node1 lost its connection to ranks 2-3 on node2 \(10\.213\.0\.2\)", log
    ), log
    assert re.search(r"srun: error: node2: tasks 2-3: Killed", log), log
    wait_for(lambda: not cluster2.task_pids(1, jid) and not cluster2.task_pids(2, jid), 30, "no rank left running")
    after = {p.relative_to(run_dir) for p in run_dir.rglob("*")}
    # nothing deleted: everything there at the kill is still there (the lock, released by rank 0, aside)
    assert before - after <= {Path(".lock")}, before - after
    assert not list(ckpts.glob("*.broken*")) and resume_tag(ckpts) == newest

    jid2 = submit(cluster2, start[0], run_dir, trainer=TRAINER, nodes=2, per_node=2)
    j2 = wait_job(cluster2, jid2, run_dir)
    log2 = job_log(run_dir, jid2)
    assert (j2["JobState"], j2["ExitCode"]) == ("COMPLETED", "0:0"), log2
    assert re.search(rf"resumed from \S*/{newest} at step {tag_step(newest)}", log2), log2
    assert metric_steps(run_dir, TRAINER) == STEPS
    ref = references.get("two_nodes")[0]
    assert losses(run_dir) == losses(ref)
    assert_same_params(final_params(run_dir, TRAINER), final_params(ref, TRAINER))
    report(
        capsys,
        f"2 nodes, node2's tasks killed after step {first}+: job FAILED in {t_end - t_kill:.1f}s; "
        f"resubmission resumed from {newest}",
    )


def test_two_nodes_match_one_node(references, capsys):
    (two, jid2, j2), (one, jid1, j1) = references.get("two_nodes"), references.get("one_node")
    log2, log1 = job_log(two, jid2), job_log(one, jid1)
    assert (j2["JobState"], j2["ExitCode"]) == ("COMPLETED", "0:0"), log2
    assert (j1["JobState"], j1["ExitCode"]) == ("COMPLETED", "0:0"), log1
    # rendezvous from the nodelist; ranks placed per node with node-local ranks
    assert re.search(r"start: nodes=node\[1-2\] tasks=4 master=node1:\d+", log2), log2
    assert "stage sft: start (world size 4: node1 ranks 0-1, node2 ranks 2-3)" in log2
    assert re.search(r"stage sft: start \(world size 4: node[12] ranks 0-3\)", log1), log1
    assert metric_steps(two, TRAINER) == metric_steps(one, TRAINER) == STEPS
    a, b = losses(two), losses(one)
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
    report(
        capsys,
        f"2 nodes vs 1 node, 4 ranks, {TRAINER.steps} steps: max relative loss difference {max(rel):.3g} "
        f"(steps {sum(r == 0 for r in rel)}/{len(rel)} bit-equal); both jobs done "
        f"{time.time() - references.t0:.0f}s after their submission",
    )
    assert max(rel) <= 1e-5, list(zip(a, b))
    for run_dir in (two, one):  # ZeRO-3: each of the 4 ranks holds about a quarter
        mem = json.loads((run_dir / "sft" / "memory_rank3.json").read_text())
        assert mem["zero_stage"] == 3 and mem["param_bytes_this_rank"] < 0.35 * mem["param_bytes_full_model"]


def test_two_node_cluster_torn_down_when_a_test_fails(cluster2, tmp_path):
    """Leaving the `with` by an exception still stops every daemon by PID and deletes the
    namespaces (with their veths, bridge and /dev/shm tmpfs). A second 2-node cluster."""
    c = LocalCluster(tmp_path / "second", nodes=2)
    with pytest.raises(RuntimeError, match="test failed"):
        with c:
            assert set(c.pids) == {"munged", "slurmctld", "slurmd-node1", "slurmd-node2"}
            assert all(map(alive, c.pids.values()))
            assert all(Path("/run/netns", n).exists() for n in c.netns) and len(c.netns) == 2
            raise RuntimeError("test failed")
    assert not any(map(alive, c.pids.values()))
    assert not any(Path("/run/netns", n).exists() for n in c.netns)
