"""The run-directory lock: one run at a time per `run_dir`.

Rank 0 holds `run_dir/.lock` for the whole command (`python -m pipeline run|stage`) and
removes it on the way out, after an error or a signal stop too. The file names its holder
(host, pid, the process's start time, SLURM job and restart count). A second run on the
same run_dir fails at once with RunDirLocked naming the holder, before it writes anything
(config.yaml included). A lock whose holder is gone is stale and taken over with a warning:
- same host: no process has that pid, or another one does now (its start time differs);
- the same SLURM job requeued (higher SLURM_RESTART_COUNT): the earlier attempt is over.
A lock held from another host by another job cannot be checked from here: the error says
to delete the file if that run is gone.

The lock file is made with os.link from a complete temporary file (atomic on local
filesystems and NFS), so it is never seen half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK = ".lock"


class RunDirLocked(RuntimeError):
    """Another run holds this run_dir."""


def _start_time(pid) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if no such process."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _start_time(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": str(path)}


def is_stale(holder: dict) -> bool:
    me = _me()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        if int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
            return True
    if holder.get("host") != me["host"] or "pid" not in holder:
        return False
    start = _start_time(holder["pid"])
    return start is None or (holder.get("start") is not None and start != holder["start"])


class RunDirLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.me: dict | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        tmp = self.path.with_name(f"{LOCK}.{me['host']}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.me = me
                    return
                except FileExistsError:
                    holder = _read(self.path)
                    if holder is None:  # released meanwhile
                        continue
                    if not is_stale(holder):
                        raise RunDirLocked(
                            f"{self.path.parent} is in use by another run ({_describe(holder)}): two runs on one "
                            f"run_dir would mix their checkpoints and metrics. Use another run_dir, or wait for "
                            f"it to end; if that run is gone (e.g. its host died), delete {self.path}"
                        ) from None
                    log.warning("%s: its holder is gone (%s); taking the lock over", self.path, _describe(holder))
                    _remove_if_same(self.path, holder)
            raise RunDirLocked(f"{self.path}: could not take the lock (another run took it first)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.me is not None and _read(self.path) == self.me:
            self.path.unlink(missing_ok=True)
        self.me = None


def _describe(holder: dict) -> str:
    if "unreadable" in holder:
        return "lock file unreadable"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}{job}"


def _remove_if_same(path: Path, holder: dict) -> None:
    """Remove the stale lock, unless another run replaced it since we read it."""
    aside = path.with_name(f"{LOCK}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    if _read(aside) != holder:  # a fresh lock got moved: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, world_size: int = 1, rank: int = 0):
    """Rank 0 holds the lock while inside; every rank raises RunDirLocked if it could not."""
    import torch
    import torch.distributed as tdist

    lock, error = RunDirLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except RunDirLocked as e:
            error = e
    if world_size > 1 and tdist.is_initialized():  # the other ranks learn rank 0's outcome
        flag = torch.tensor([int(error is not None)], device="cuda" if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and error is None:
            error = RunDirLocked(f"rank 0 could not lock {run_dir} (its error names the holder)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()
