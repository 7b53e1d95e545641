"""pipeline/core/distributed.py: launcher environment mapping (pure) and stop-signal agreement
across two real gloo processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.core.distributed import expand_nodelist, expand_tasks_per_node, first_host, map_env, port_from_job_id


def port():
    return 29999


def test_nodelist_parsing():
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("a,b") == ["a", "b"]
    assert expand_nodelist("gpu[9-11],cpu-x") == ["gpu9", "gpu10", "gpu11", "cpu-x"]
    assert expand_nodelist("r[1-2]-n[1-2]") == ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    assert first_host("node[01-03,07]") == "node01"
    assert first_host("vm") == "vm"


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("x")


def test_torchrun_env():
    env = dict(
        RANK="3",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="n0",
        MASTER_PORT="1234",
        TORCHELASTIC_RUN_ID="x",
        SLURM_PROCID="0",
        SLURM_STEP_ID="0",
        SLURM_NTASKS="1",
    )  # torchrun inside srun
    assert map_env(env, port) == dict(
        RANK="3",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        LOCAL_SIZE="2",
        MASTER_ADDR="n0",
        MASTER_PORT="1234",
        LAUNCHER="torchrun",
    )


def test_deepspeed_launcher_env():
    env = dict(
        RANK="5",
        WORLD_SIZE="16",
        LOCAL_RANK="5",
        LOCAL_SIZE="8",
        CROSS_RANK="0",
        CROSS_SIZE="2",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="29500",
    )
    m = map_env(env, port)
    assert m["LAUNCHER"] == "deepspeed"
    assert (m["RANK"], m["WORLD_SIZE"], m["LOCAL_SIZE"], m["MASTER_ADDR"]) == ("5", "16", "8", "10.0.0.1")


def slurm_step_env(**kw):
    env = dict(
        SLURM_JOB_ID="123456",
        SLURM_STEP_ID="0",
        SLURM_PROCID="9",
        SLURM_NTASKS="12",
        SLURM_STEP_NUM_TASKS="12",
        SLURM_LOCALID="1",
        SLURM_NODEID="2",
        SLURM_STEP_TASKS_PER_NODE="4(x2),2,2",
        SLURM_JOB_NODELIST="gpu[07-09,12]",
        SLURM_STEP_NODELIST="gpu[07-09,12]",
    )
    env.update(kw)
    return env


def test_slurm_srun_env():
    m = map_env(slurm_step_env(), port)
    assert m == dict(
        RANK="9",
        WORLD_SIZE="12",
        LOCAL_RANK="1",
        LOCAL_SIZE="2",
        MASTER_ADDR="gpu07",
        MASTER_PORT=str(port_from_job_id(123456)),
        LAUNCHER="slurm",
    )
    # What the batch script exported wins; --ntasks-per-node gives the local size directly.
    m = map_env(slurm_step_env(MASTER_ADDR="10.1.1.1", MASTER_PORT="4000", SLURM_NTASKS_PER_NODE="4"), port)
    assert (m["MASTER_ADDR"], m["MASTER_PORT"], m["LOCAL_SIZE"]) == ("10.1.1.1", "4000", "4")


def test_slurm_batch_shell_is_not_a_rank():
    # The batch shell has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step: a python
    # started there without srun is a single process, not rank 0 of a world that never comes.
    env = {k: v for k, v in slurm_step_env(SLURM_PROCID="0").items() if not k.startswith("SLURM_STEP")}
    m = map_env(env, port)
    assert (m["LAUNCHER"], m["WORLD_SIZE"], m["RANK"], m["MASTER_PORT"]) == ("single", "1", "0", "29999")


def test_single_process_env():
    m = map_env({}, port)
    assert m == dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29999",
        LAUNCHER="single",
    )


TWO_NODES = dict(
    hosts=(("node1", "10.213.0.1"), ("node1", "10.213.0.1"), ("node2", "10.213.0.2"), ("node2", "10.213.0.2"))
)


def dist_info(rank, **kw):
    from pipeline.core.distributed import DistInfo

    return DistInfo(rank, 4, rank % 2, 2, "node1", 15000, "slurm", **kw)


def test_placement_names_hosts_and_their_ranks():
    assert dist_info(0, **TWO_NODES).placement() == "node1 ranks 0-1, node2 ranks 2-3"
    scattered = (("a", "x"), ("b", "y"), ("a", "x"))
    assert dist_info(0, hosts=scattered).placement() == "a ranks 0,2, b rank 1"


def test_lost_peer_names_the_ranks_behind_the_address():
    from pipeline.core.distributed import PeerLost, lost_peer

    # gloo's message when a peer's process died (measured on the two-node local cluster)
    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[10.213.0.2]:35520. This is typically caused by a remote worker crashing."
    )
    e = lost_peer(gloo, dist_info(1, **TWO_NODES))
    assert isinstance(e, PeerLost)
    assert "rank 1 on node1 lost its connection to ranks 2-3 on node2 (10.213.0.2)" in str(e)
    assert "resume from the newest complete checkpoint" in str(e)
    # found through the exception chain; this rank itself is not one of the lost
    try:
        try:
            raise RuntimeError("Read error [10.213.0.1]:4242: Connection reset by peer")
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert "rank 1 on node1 (10.213.0.1)" in str(lost_peer(outer, dist_info(0, **TWO_NODES)))
    # an address no rank reported, and no host table at all
    assert "the rank at 10.9.9.9" in str(lost_peer(RuntimeError("Connection closed by peer [10.9.9.9]:1"), None))
    # anything else is not a lost peer
    assert lost_peer(RuntimeError("CUDA out of memory"), dist_info(0, **TWO_NODES)) is None
    assert lost_peer(ValueError("Connection closed by peer [10.213.0.2]:1"), dist_info(0, **TWO_NODES)) is None


WORKER = r"""
import json, sys, time
from pipeline.core import distributed as dist
stop = dist.StopSignal()
info = dist.init_distributed()
print("ready", flush=True)
step = 0
while not stop.should_stop():
    step += 1
    time.sleep(0.01)
    assert step < 3000, "no agreement"
print(json.dumps(dict(rank=info.rank, world=info.world_size, launcher=info.launcher, step=step,
                      signal=stop.signal_name, preempted=stop.preempted)), flush=True)
dist.shutdown()
"""


@pytest.mark.timeout(300)  # first DeepSpeed CPU init on a machine JIT-builds its shm op
@pytest.mark.parametrize("sig,target", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_stop_signal_agreement_two_gloo_ranks(sig, target):
    from pipeline.core.distributed import free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    base.update(
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TORCHELASTIC_RUN_ID="test",
        DS_ACCELERATOR="cpu",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
        )
        for r in range(2)
    ]
    try:
        for p in procs:  # DeepSpeed prints on stdout too: read up to our line
            while (line := p.stdout.readline()) and line.strip() != "ready":
                pass
            assert line, "worker died before init"
        time.sleep(0.3)  # some steps go by
        procs[target].send_signal(sig)  # one rank only
        outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert {o["launcher"] for o in outs} == {"torchrun"} and {o["world"] for o in outs} == {2}
    assert outs[0]["step"] == outs[1]["step"] > 1  # both stop after the same step
    name = "SIGUSR1" if sig == signal.SIGUSR1 else "SIGTERM"
    assert [o["signal"] for o in outs] == [name, name]
    assert [o["preempted"] for o in outs] == [sig == signal.SIGUSR1] * 2
