"""Training checkpoints: DeepSpeed's own save/load, with a `latest` that only ever names a
complete checkpoint.

DeepSpeed writes `latest` itself at the end of `save_checkpoint`, before the last barrier,
so a rank dying mid-save can leave `latest` naming a tag whose other ranks' files are
missing. Here `save_checkpoint(..., save_latest=False)` writes the tag, every rank checks
in at a barrier, and only then rank 0 replaces `latest` atomically (write tmp, fsync,
rename). Older tags are deleted only after that, keeping `keep` of them, so the previous
complete checkpoint survives until the new one is. A partial tag left by a crash is
simply overwritten by the next save with that name.

`latest` keeps DeepSpeed's format (the tag as text), so `engine.load_checkpoint(dir)`
and DeepSpeed's `zero_to_fp32` read it as they always do.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipeline.distributed import barrier, rank

DIRNAME = "checkpoints"
LATEST = "latest"
TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, keep: int = 2) -> str:
    """Collective: every rank calls it. Returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    _fsync_tree(ckpt_dir / tag)  # each rank's own files are on disk before it checks in
    barrier()
    if rank() == 0:
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep=max(keep, 1), current=tag)
    barrier()
    return tag


def load(engine, ckpt_dir: str | os.PathLike) -> dict | None:
    """Restore engine (weights, optimizer, scheduler) from `latest`; returns the client
    state (this rank's own: ZeRO-3 saves one model-states file per rank), or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it")
    return client_state


def consolidated_state_dict(ckpt_dir: str | os.PathLike) -> dict:
    """Full fp32 weights of `latest`, from DeepSpeed's zero_to_fp32 (ZeRO 1-3; plain
    module states for stage 0). One process, no engine."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (no valid 'latest')")
    tag_dir = Path(ckpt_dir) / tag
    if not any(tag_dir.glob("*optim_states.pt")):  # ZeRO stage 0: the module is whole
        import torch

        return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))
    current_step = int(TAG_RE.match(current).group(1))
    older = [name for step, name in tags if step < current_step]
    newer = [name for step, name in tags if step > current_step]  # partial leftovers of a crash
    for name in older[: max(len(older) - (keep - 1), 0)] + newer:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for p in path.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
