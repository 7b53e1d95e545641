"""The one place the launch environment is mapped, plus stop/preemption signals.

Launchers
---------
`map_env` turns a launcher's environment into the variables torch.distributed and
DeepSpeed read (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT):

- torchrun / deepspeed launcher: they already export RANK and friends; used as they are
  (they win even inside a SLURM allocation, where SLURM_PROCID is also set).
- SLURM `srun`: one task per GPU; SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the local
  task count from SLURM_NTASKS_PER_NODE or SLURM_(STEP_)TASKS_PER_NODE, MASTER_ADDR from
  the first host of the step's nodelist and MASTER_PORT from the job id, unless the batch
  script exported them. No deepspeed launcher and no mpi4py needed.
- nothing: a single process (world 1) on a free local port.

`init_distributed()` exports them into os.environ (DeepSpeed reads the environment and,
without it, falls back to mpi4py discovery) and starts the process group through
`deepspeed.init_distributed`: gloo on CPU, nccl on CUDA. `shutdown()` ends it cleanly.
With more than one rank it also gathers every rank's host and address (`DistInfo.hosts`):
the start line says which ranks run where, and `lost_peer` names the ranks behind the
address of a connection that a collective lost.

A rank that dies (its node's tasks killed, the node gone) closes its sockets; the other
ranks' next collective raises "Connection closed by peer [ADDR]:PORT" (gloo) at once.
`lost_peer` turns that into `PeerLost` naming the ranks and host at ADDR; the command exits
1 and srun (`--kill-on-bad-exit`) ends the step. Nothing is deleted: a rerun resumes from the
newest complete checkpoint. A peer that stops answering without closing (a frozen host)
is only noticed at the process group's timeout (DeepSpeed's default: 10 min, env
DEEPSPEED_TIMEOUT in minutes).

Stop / preemption contract (followed by slurm/train.sbatch; see slurm/README.md)
-------------------------------------------------------------------------------
- `StopSignal()` is created first thing (before model building: Python's default action
  for SIGUSR1 is to die). Handlers only record the signal.
- The train loop calls `stop.should_stop()` once per optimizer step. It is collective
  (all_reduce MAX), so every rank stops after the same step and can enter the collective
  ZeRO-3 `save_checkpoint` together.
- SIGUSR1 = preempted (`#SBATCH --signal=USR1@N`, `scancel --signal=USR1`): save a
  checkpoint, then, if training is not finished, call `mark_preempted(run_dir)` (writes
  `${run_dir}/.preempted` after the checkpoint is complete), and exit 0.
- SIGTERM = stop (plain `scancel`, node shutdown): save a checkpoint and exit 0, no marker.
  SIGTERM wins over an earlier SIGUSR1.
- A finished run exits 0 without a marker, whatever signal arrived.
- Any failure exits non-zero (never writes the marker).
- Requeue: slurm/train.sbatch deletes the marker before `srun`, and after `srun` returns
  0 with the marker present runs `scontrol requeue $SLURM_JOB_ID`. It exports
  ATP_REQUEUE_BY=sbatch so `mark_preempted` leaves it at that. Launched any other way
  under SLURM (e.g. `sbatch --wrap "srun python -m pipeline ..."`), `mark_preempted`
  makes rank 0 run `scontrol requeue` itself (`requeue_self`).
- The requeued job (same job id, SLURM_RESTART_COUNT>0) resumes from the newest complete
  checkpoint (pipeline/train/checkpoint.py) like any rerun of the same command.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

PREEMPTED_MARKER = ".preempted"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "deepspeed" | "env" | "slurm" | "single"
    hosts: tuple = ()  # (hostname, address) of every rank, in rank order; () for one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def placement(self) -> str:
        """ "node1 ranks 0-1, node2 ranks 2-3" (hosts in order of their first rank)."""
        by_host: dict[str, list[int]] = {}
        for r, (host, _) in enumerate(self.hosts):
            by_host.setdefault(host, []).append(r)
        return ", ".join(f"{h} {_ranks(rs)}" for h, rs in by_host.items())


# ---------------------------------------------------------------- pure mapping helpers


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets: "a[1-2],b" -> ["a[1-2]", "b"]."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p for p in out if p]


def _expand_range(body: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"], keeping zero padding."""
    items = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            items.append(lo)
        else:
            items += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return items


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm hostlist syntax -> host names ("node[01-03,07]", "a,b", "r[1-2]-n[1-2]")."""
    hosts = []
    for item in _split_top(nodelist.strip()):
        m = re.search(r"\[([^\]]*)\]", item)
        if not m:
            hosts.append(item)
            continue
        head, tail = item[: m.start()], item[m.end() :]
        for mid in _expand_range(m.group(1)):
            hosts += expand_nodelist(head + mid + tail)  # tail may hold more brackets
    return hosts


def first_host(nodelist: str) -> str:
    return expand_nodelist(nodelist)[0]


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _ranks(ranks: list[int]) -> str:
    """[2, 3] -> "ranks 2-3"; [0, 2] -> "ranks 0,2"; [1] -> "rank 1"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def port_from_job_id(job_id: str | int) -> int:
    # Same formula in slurm/train.sbatch; a requeued job keeps its id and so its port.
    return 15000 + int(job_id) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_env(env: Mapping[str, str], pick_port: Callable[[], int] = free_port) -> dict:
    """Launcher environment -> {RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR,
    MASTER_PORT, LAUNCHER} (all strings). Pure apart from `pick_port` (single process)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        world = int(env["WORLD_SIZE"])
        local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world
        out = dict(
            RANK=env["RANK"],
            WORLD_SIZE=world,
            LOCAL_RANK=env.get("LOCAL_RANK", 0),
            LOCAL_SIZE=local_size,
            MASTER_ADDR=env.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=env.get("MASTER_PORT") or pick_port(),
        )
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID: inside an srun step. The batch shell also has SLURM_PROCID=0 and
        # the allocation's SLURM_NTASKS; treating it as rank 0 of N would hang.
        launcher = "slurm"
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        if env.get("SLURM_NTASKS_PER_NODE"):
            local_size = int(env["SLURM_NTASKS_PER_NODE"])
        else:
            spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
            local_size = expand_tasks_per_node(spec)[int(env.get("SLURM_NODEID", 0))]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job_id = env.get("SLURM_JOB_ID", "0")
        out = dict(
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=world,
            LOCAL_RANK=env.get("SLURM_LOCALID", 0),
            LOCAL_SIZE=local_size,
            MASTER_ADDR=env.get("MASTER_ADDR") or first_host(nodelist),
            MASTER_PORT=env.get("MASTER_PORT") or port_from_job_id(job_id),
        )
    else:
        launcher = "single"
        out = dict(
            RANK=0,
            WORLD_SIZE=1,
            LOCAL_RANK=0,
            LOCAL_SIZE=1,
            MASTER_ADDR=env.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=env.get("MASTER_PORT") or pick_port(),
        )
    out = {k: str(v) for k, v in out.items()}
    out["LAUNCHER"] = launcher
    return out


# ---------------------------------------------------------------- process group

_info: DistInfo | None = None


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(backend: str | None = None) -> DistInfo:
    """Map the environment, export it, start the process group. Idempotent."""
    global _info
    if _info is not None and tdist.is_initialized():
        return _info
    m = map_env(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ[k] = m[k]
    cuda = use_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks one
    local_rank = int(m["LOCAL_RANK"])
    if cuda:  # before nccl init, so each rank owns its GPU; modulo: srun --gpu-bind may
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # show one GPU per task
    import deepspeed  # late: importing it costs seconds and reads DS_ACCELERATOR

    deepspeed.init_distributed(
        dist_backend=backend or ("nccl" if cuda else "gloo"), auto_mpi_discovery=False, verbose=False
    )
    if not cuda:
        _unlink_shm_buffer(m)
    hosts = ()
    if int(m["WORLD_SIZE"]) > 1:
        hosts = [None] * int(m["WORLD_SIZE"])
        tdist.all_gather_object(hosts, _host_and_address())
        hosts = tuple(map(tuple, hosts))
    _info = DistInfo(
        int(m["RANK"]),
        int(m["WORLD_SIZE"]),
        local_rank,
        int(m["LOCAL_SIZE"]),
        m["MASTER_ADDR"],
        int(m["MASTER_PORT"]),
        m["LAUNCHER"],
        hosts,
    )
    return _info


def _host_and_address() -> tuple[str, str | None]:
    """This host's name and the address it resolves to, which gloo's sockets use (None if
    the name does not resolve)."""
    host = socket.gethostname()
    try:
        return host, socket.gethostbyname(host)
    except OSError:
        return host, None


def _unlink_shm_buffer(m: Mapping[str, str]) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank (~69 MB) and never
    removes it: every run left them behind, and 300 of them filled 19 GB of RAM here.
    Once every rank has mapped its peers' files (the barrier), the names can go; the
    mappings stay valid until the processes exit."""
    tdist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{m['MASTER_ADDR']}_{m['MASTER_PORT']}_{m['RANK']}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shm op (it failed to build, or another accelerator)
        pass


def shutdown() -> None:
    """Barrier + destroy: gloo ranks that exit without it sometimes SIGABRT after
    finishing, and SLURM then marks the job FAILED."""
    global _info
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    _info = None


# ---------------------------------------------------------------- a lost peer


class PeerLost(RuntimeError):
    """A collective lost its connection to another rank: that rank died or its node went away."""


# gloo: "Connection closed by peer [10.0.0.2]:35520", "Read error [10.0.0.2]:35520: Connection
# reset by peer", "... Broken pipe"
_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe")
_PEER_ADDR = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")


def lost_peer(exc: BaseException, info: DistInfo | None = None) -> PeerLost | None:
    """`exc` (or an exception it was raised from) is a collective's lost connection: a
    PeerLost naming the ranks and host at the peer's address; None otherwise."""
    info = info or _info
    for _ in range(8):  # the exception and what it was raised from
        if exc is None:
            return None
        msg = str(exc)
        if isinstance(exc, RuntimeError) and _LOST.search(msg) and (m := _PEER_ADDR.search(msg)):
            addr = m.group(1)
            hosts = info.hosts if info else ()
            ranks = [r for r, (_, a) in enumerate(hosts) if a == addr and r != info.rank]
            where = f"{_ranks(ranks)} on {hosts[ranks[0]][0]} ({addr})" if ranks else f"the rank at {addr}"
            me = f"rank {info.rank} on {hosts[info.rank][0]}" if hosts else "this rank"
            return PeerLost(
                f"{me} lost its connection to {where}: a rank there died or its node went away "
                f"(its own log or srun's says why). Nothing was deleted; rerun the same command to "
                f"resume from the newest complete checkpoint. ({msg.splitlines()[0][:200]})"
            )
        exc = exc.__cause__ or exc.__context__
    return None


# ---------------------------------------------------------------- stop signals


class StopRequested(BaseException):
    """A stop signal arrived inside `StopSignal.interruptible()`. A BaseException, so that no
    `except Exception` on the way (webdataset's handlers, the loader's catch-all) swallows it."""


class StopSignal:
    """Records SIGUSR1 (preempted: save, requeue) and SIGTERM (save, exit); `should_stop`
    makes all ranks agree. Create it before anything slow."""

    # Agreement uses MAX, so a higher code wins: TERM overrides USR1 on any rank.
    _CODES = {signal.SIGUSR1: 1, signal.SIGTERM: 2}

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self._local = 0  # strongest signal seen by this process
        self.agreed = 0  # strongest signal seen by any rank at the last should_stop()
        self._interrupt = False
        self._pid = os.getpid()  # DataLoader workers inherit the handler: only this process raises
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        # Only record: the train loop saves at a step boundary where all ranks meet. Inside
        # `interruptible()` (a wait that may not end, e.g. for data) raise as well.
        self._local = max(self._local, self._CODES.get(signum, 2))
        if self._interrupt and os.getpid() == self._pid:
            self._interrupt = False
            raise StopRequested(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interruptible(self):
        """A stop signal arriving inside raises StopRequested here (local: no agreement)."""
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def should_stop(self) -> bool:
        """Collective when the process group is up: call it on every rank, once per step."""
        flag = self._local
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device="cuda" if tdist.get_backend() == "nccl" else "cpu")
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            flag = int(t.item())
        self.agreed = max(self.agreed, flag)
        return self.agreed > 0

    @property
    def preempted(self) -> bool:
        """The agreed signal was USR1 only: save, then requeue."""
        return self.agreed == 1

    @property
    def signal_name(self) -> str | None:
        return {0: None, 1: "SIGUSR1", 2: "SIGTERM"}[self.agreed]


def rank() -> int:
    """This process's rank: the process group's, else the launcher's RANK, else 0."""
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def barrier() -> None:
    """All ranks meet here; a no-op without a process group (single process, tests)."""
    if tdist.is_initialized():
        tdist.barrier()


def requeue_self() -> bool:
    """Rank 0 runs `scontrol requeue $SLURM_JOB_ID` (needs a job submitted with
    --requeue). Returns True if it ran and succeeded."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or rank() != 0:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0


def mark_preempted(run_dir: str | os.PathLike) -> None:
    """Call after the checkpoint is saved, on all ranks, when stop.preempted and training
    is not finished. Rank 0 writes `${run_dir}/.preempted`; unless slurm/train.sbatch
    requeues (ATP_REQUEUE_BY=sbatch), rank 0 also requeues the job itself."""
    if rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / PREEMPTED_MARKER).write_text(os.environ.get("SLURM_JOB_ID", "") + "\n")
        if os.environ.get("ATP_REQUEUE_BY") != "sbatch":
            requeue_self()
