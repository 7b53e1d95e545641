"""Training checkpoints: DeepSpeed's own save/load, a completion marker per tag, and a resume
point that never rests on `latest` alone.

Save (collective): `save_checkpoint(..., save_latest=False)` writes the tag (DeepSpeed writes
`latest` itself before its last barrier, so a rank dying mid-save could leave it naming a
partial tag); every rank fsyncs its files and checks in at a barrier; then rank 0 writes
`TAG/COMPLETE` atomically (each file of the tag with its size), replaces `latest`
atomically, and prunes. `latest` keeps DeepSpeed's format (the tag as text), so DeepSpeed's
own tools (`zero_to_fp32`, `engine.load_checkpoint(dir)`) read it as they always do.

Resume (`load`): the newest tag with a COMPLETE marker whose files are all there at the sizes
it records. `latest` is only a hint: lost, or naming a missing or older tag, it changes
nothing (a warning says so). A broken tag (a file missing or not at its recorded size; in a
single process also one that fails to load) is named in a warning, skipped in favour of the
previous complete one, and kept aside as `TAG.broken` (never deleted). With several ranks a
tag that passes that check but fails to load stops the run with the tag named (their loads
are collective: one rank cannot skip alone).

A tag saved with another configuration (ZeRO stage, parameter shapes, frozen set, model
architecture, global batch; recorded in its marker, pipeline/train/ckpt_record.py) is not broken:
`resume_plan` refuses it before loading anything with CheckpointMismatch (exit status 2),
naming what differs, and renames nothing; rerun with the configuration it was saved with to
resume from it.

A ZeRO-3 tag saved on another world size is resumed through DeepSpeed's universal checkpoint:
rank 0 converts it once (deepspeed.checkpoint.ds_to_universal) into `universal/TAG` beside
the tags, with its own COMPLETE marker (a torn conversion is redone), and the engine, built
with `checkpoint.load_universal`, loads it (`load(..., universal=True)`); the original tag is
not touched. The marker of every ZeRO-3 save holds a digest of the fp32 master weights that
does not depend on the partitioning (`fp32_digest`): after a reshaped load every rank
recomputes it and a difference stops the run, so the resumed weights are bit-identical to
the saved ones. The next save on the new world size writes a native tag and removes
`universal/`.

A save that fails because the disk is full (torch reports only "basic_ios::clear: iostream
error") raises CheckpointDiskFull naming the tag, the bytes it needs and the bytes free. The
torn tag has no marker: the rerun resumes from the one before and its next save deletes it.

Tags without a marker are saves that did not finish, once this directory has `FORMAT`
(written by the first save of this code) or any marker: the next save deletes those newer
than itself. A directory from before the markers (no FORMAT, no marker) resumes from the tag
`latest` names, as the old code did, and that tag is marked then; without a usable `latest`
it is refused (CheckpointError) rather than guessed. A save never prunes a complete tag
newer than itself: it raises CheckpointError (to go back to an earlier step, move the newer
tags away).

Loading runs torch.load with weights_only=True for every file, DeepSpeed's own loads
included (they pass weights_only=False; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides
that inside `safe_loads`), with the few non-tensor types DeepSpeed and the client state
pickle allow-listed (`safe_globals()`). No pickled code runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

from pipeline.core.distributed import barrier, rank
from pipeline.train import ckpt_record

log = logging.getLogger(__name__)
DIRNAME = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"  # per tag: written by rank 0 once every rank's files are on disk
FORMAT = "FORMAT"  # per directory: its tags carry COMPLETE markers
UNIVERSAL = "universal"  # per directory: tags converted for another world size
TAG_RE = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint directory this code will not guess about or overwrite; the message says what to do."""


class BrokenCheckpoint(CheckpointError):
    """A tag whose files are not what its COMPLETE marker records."""


class CheckpointMismatch(CheckpointError):
    """A sound tag saved with another configuration (world size, ZeRO stage, model): not loadable
    by this run, and not broken either. The CLI exits 2 on it, as on a config error."""


class CheckpointDiskFull(CheckpointError):
    """A save that ran out of disk space; the message names the tag, the bytes needed and free."""


class NonFiniteWeights(CheckpointError):
    """Weights with NaN or inf: not exported."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """The step tags in the directory, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=step_of)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag `latest` names, if that tag exists (DeepSpeed's pointer; see `resume_tag`)."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def verify(tag_dir: Path) -> None:
    """Raise BrokenCheckpoint unless every file the marker lists is there at its size."""
    files = json.loads((tag_dir / COMPLETE).read_text())["files"]
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise BrokenCheckpoint(f"{path}: missing")
        if path.stat().st_size != size:
            raise BrokenCheckpoint(f"{path}: {path.stat().st_size} bytes, {size} when saved (truncated or replaced)")


def candidates(ckpt_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Verified tags, newest first (the first is the resume point, the others fallbacks if it
    fails to load), and the broken tags newer than all of them: (tag, why)."""
    d = Path(ckpt_dir)
    all_tags = tags(d)
    complete = [t for t in all_tags if is_complete(d / t)]
    if not complete and not (d / FORMAT).is_file():  # a directory from before the markers
        legacy = latest_tag(d)
        if legacy is not None:
            return [legacy], []
        if all_tags:
            raise CheckpointError(
                f"{d} holds {all_tags} without completion markers (saved before they existed) and no "
                f"valid '{LATEST}': cannot tell which is complete. Write the tag to resume from into "
                f"{d / LATEST} (e.g. {all_tags[-1]}), or move the tags away to start over."
            )
        return [], []
    good, broken = [], []
    for t in reversed(complete):
        try:
            verify(d / t)
            good.append(t)
        except (BrokenCheckpoint, OSError, ValueError, KeyError) as e:
            if not good:  # broken ones older than the resume point are left to pruning
                broken.append((t, str(e)))
    return good, broken


def resume_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag a resume starts from (before trying to load it), or None for a fresh start."""
    good, _ = candidates(ckpt_dir)
    return good[0] if good else None


def saved_with(tag_dir: Path) -> dict:
    """The run a tag was saved with: its marker's record, else what DeepSpeed's file names tell."""
    marker = tag_dir / COMPLETE
    if marker.is_file():
        data = json.loads(marker.read_text())
        if "saved_with" in data:
            return data["saved_with"]
        return ckpt_record.inferred(list(data["files"]))
    return ckpt_record.inferred([p.name for p in tag_dir.iterdir()])


def check_resumable(
    ckpt_dir: str | os.PathLike, now: dict | None, tag: str | None = None, allow_batch_change: bool = False
) -> bool:
    """Raise CheckpointMismatch if the resume tag (or `tag`) was saved with a configuration
    this run cannot load (ckpt_record.differences); else whether it needs reshaping (another
    world size, through the universal checkpoint). False without a record or a tag."""
    tag = tag or resume_tag(ckpt_dir)
    if now is None or tag is None:
        return False
    tag_dir = Path(ckpt_dir) / tag
    saved = saved_with(tag_dir)
    diff = ckpt_record.differences(saved, now, allow_batch_change=allow_batch_change)
    if diff:
        raise CheckpointMismatch(
            f"checkpoint {tag_dir} was saved with another configuration than this run's: {'; '.join(diff)}. "
            "It is not broken and nothing was renamed: rerun with the configuration it was saved with to "
            f"resume from it, or move {ckpt_dir} away to start over."
        )
    return ckpt_record.reshaped(saved, now)


def resume_plan(ckpt_dir: str | os.PathLike, now: dict, allow_batch_change: bool = False):
    """Before the engine exists: None for a fresh start, else (tag, reshaped, saved_with).
    Raises CheckpointMismatch (nothing renamed) for a tag this run cannot load."""
    tag = resume_tag(ckpt_dir)
    if tag is None:
        return None
    reshape = check_resumable(ckpt_dir, now, tag, allow_batch_change=allow_batch_change)
    return SimpleNamespace(tag=tag, reshaped=reshape, saved_with=saved_with(Path(ckpt_dir) / tag))


def to_universal(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    """Collective. Rank 0 converts `tag` with DeepSpeed's ds_to_universal into
    ckpt_dir/universal/TAG (once: a complete conversion is reused); the original is read
    only. Returns the directory that `load(..., universal=True)` reads."""
    ckpt_dir = Path(ckpt_dir)
    root = ckpt_dir / UNIVERSAL
    out = root / tag
    if rank() == 0 and not is_complete(out):
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)  # a torn conversion
        root.mkdir(parents=True, exist_ok=True)
        log.info("converting %s to a universal checkpoint in %s (another world size)", ckpt_dir / tag, out)
        args = argparse.Namespace(
            input_folder=str(ckpt_dir / tag),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        with safe_loads(), contextlib.redirect_stdout(_LogWriter()):
            ds_to_universal.main(args)
        _fsync_tree(out)
        _mark_complete(out, saved_with(ckpt_dir / tag), fp32_digest=saved_digest(ckpt_dir, tag))
    barrier()
    return root


class _LogWriter:
    """ds_to_universal prints its progress: into the log at debug level."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("ds_to_universal: %s", text.strip())

    def flush(self) -> None:
        pass


def saved_digest(ckpt_dir: str | os.PathLike, tag: str) -> str | None:
    marker = Path(ckpt_dir) / tag / COMPLETE
    return json.loads(marker.read_text()).get("fp32_digest") if marker.is_file() else None


def fp32_digest(engine) -> str | None:
    """Collective. A digest of the fp32 master weights (the module's own tensors for frozen
    parameters) that does not depend on how ZeRO-3 partitions them: every element's bits,
    weighted by its parameter's name and its flat index, summed over the ranks modulo 2**64.
    Equal digests: the same weights at the same places (up to a 2**-64 chance). None below
    ZeRO-3."""
    import torch
    import torch.distributed as tdist
    from deepspeed.utils import safe_get_local_fp32_param

    if engine.zero_optimization_stage() != 3:
        return None
    me = tdist.get_rank() if tdist.is_initialized() else 0
    total = torch.zeros((), dtype=torch.int64, device=engine.device)  # on the device: no copies to the host
    for name, p in engine.module.named_parameters():
        local = safe_get_local_fp32_param(p) if p.requires_grad else None
        if local is None:
            local = p.ds_tensor
        local = local.detach().float().reshape(-1).to(total.device)
        size = p.ds_tensor.ds_numel  # the partition size: rank r holds [r*size, (r+1)*size) of the flat tensor
        index = torch.arange(local.numel(), dtype=torch.int64, device=total.device) + me * size
        keep = index < p.ds_numel  # the last partitions are padded
        bits = local.view(torch.int32).to(torch.int64)[keep] & 0xFFFFFFFF
        weight = (index[keep] * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**31 - 1) + 1
        total += (bits * weight).sum()  # < 2**63 per element; the sum wraps modulo 2**64
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(total)
    return f"{int(total) % 2**64:016x}"


def save(
    engine,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict,
    keep: int = 2,
    record: dict | None = None,
    digest: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the tag. `record` (ckpt_record.record) goes
    into the marker, for `check_resumable`; with `digest`, also `fp32_digest(engine)`."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    _refuse_newer_complete(ckpt_dir, step)  # on every rank: all raise, none waits at a barrier
    weights = fp32_digest(engine) if digest else None
    if rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not (ckpt_dir / FORMAT).is_file():
            _write_atomic(ckpt_dir / FORMAT, "tags carry a COMPLETE marker (pipeline/train/checkpoint.py)\n")
        (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)  # this tag is rewritten now
    barrier()
    with _naming_disk_full(ckpt_dir, tag, record):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        _fsync_tree(ckpt_dir / tag)  # each rank's own files are on disk before it checks in
    barrier()
    if rank() == 0:
        with _naming_disk_full(ckpt_dir, tag, record):  # a marker that failed is not there: the tag is torn
            _mark_complete(ckpt_dir / tag, record, fp32_digest=weights)
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep=max(keep, 1), current=tag)
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)  # a conversion is not needed past a native save
    barrier()
    return tag


def load(
    engine,
    ckpt_dir: str | os.PathLike,
    world_size: int = 1,
    record: dict | None = None,
    universal: str | None = None,
    allow_batch_change: bool = False,
) -> tuple[str, dict] | None:
    """Restore engine (weights, optimizer, scheduler) from the newest complete checkpoint;
    returns (tag, this rank's client state) or None for a fresh start. A tag saved with
    another configuration than `record` raises CheckpointMismatch before anything is loaded
    or renamed. A tag that fails to load is skipped for the previous one in a single
    process; with several ranks (whose loads are collective) the error stops the run,
    naming the tag. `universal`: the tag to load from its conversion (`to_universal`; the
    engine built with checkpoint.load_universal), with no fallback, its weights checked
    against the saved digest (rank 0's client state, for every rank)."""
    ckpt_dir = Path(ckpt_dir)
    if universal is not None:
        return _load_universal(engine, ckpt_dir, universal)
    good, broken = candidates(ckpt_dir)
    pointer = latest_tag(ckpt_dir)
    for t, why in broken:
        if rank() == 0:
            log.warning("checkpoint %s/%s is broken (%s): skipped, kept as %s.broken", ckpt_dir, t, why, t)
    loaded = None
    for t in good:
        if check_resumable(ckpt_dir, record, tag=t, allow_batch_change=allow_batch_change):
            raise CheckpointMismatch(  # before any rename: a mismatch is not damage
                f"checkpoint {ckpt_dir / t} was saved on world size {saved_with(ckpt_dir / t)['world_size']}: "
                "it loads through its universal conversion (resume_plan, to_universal), not directly; "
                "nothing was renamed"
            )
        try:
            with safe_loads():
                path, client_state = engine.load_checkpoint(
                    str(ckpt_dir), tag=t, load_optimizer_states=True, load_lr_scheduler_states=True
                )
            if path is None:
                raise CheckpointError("DeepSpeed could not load it")
        except Exception as e:
            if world_size > 1:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir}/{t} failed to load ({e!r}); move it away to resume from the one before"
                ) from e
            log.warning("checkpoint %s/%s failed to load (%r): skipped, kept as %s.broken", ckpt_dir, t, e, t)
            broken.append((t, repr(e)))
            continue
        loaded = (t, client_state)
        break
    if loaded is not None and pointer not in (None, loaded[0]) and rank() == 0:
        log.warning("'%s' names %s; resuming from %s, the newest complete checkpoint", LATEST, pointer, loaded[0])
    elif loaded is not None and pointer is None and rank() == 0:
        log.warning("'%s' is missing or names no checkpoint; resuming from %s, found by its marker", LATEST, loaded[0])
    legacy = loaded is not None and not is_complete(ckpt_dir / loaded[0])
    if broken or legacy:
        barrier()  # every rank has chosen before rank 0 changes the directory
        if rank() == 0:
            for t, _ in broken:
                _set_aside(ckpt_dir / t)
            if legacy:  # from before the markers, trusted as `latest` said: marked now
                _mark_complete(ckpt_dir / loaded[0], record)
        barrier()
    if loaded is None and broken:
        raise CheckpointError(f"{ckpt_dir}: every checkpoint is broken ({[t for t, _ in broken]}, kept as *.broken)")
    return loaded


def _load_universal(engine, ckpt_dir: Path, tag: str) -> tuple[str, dict]:
    root = ckpt_dir / UNIVERSAL
    if not engine._config.load_universal_checkpoint:
        raise CheckpointError("a universal checkpoint needs an engine built with checkpoint.load_universal=true")
    with safe_loads():
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise CheckpointError(f"{root / tag}: DeepSpeed could not load the universal checkpoint")
    want, got = saved_digest(root, tag), fp32_digest(engine)
    if want is not None and got != want:
        raise CheckpointError(
            f"{root / tag}: the fp32 weights loaded on this world size differ from those saved in {ckpt_dir / tag} "
            f"(digest {got}, saved {want}); the original is untouched: resume on its world size"
        )
    if rank() == 0:
        log.info(
            "loaded %s through its universal conversion: fp32 weights identical to the saved ones (digest %s)",
            ckpt_dir / tag,
            got,
        )
    return tag, client_state


def consolidated_state_dict(ckpt_dir: str | os.PathLike) -> dict:
    """Full fp32 weights of the newest complete checkpoint, from DeepSpeed's zero_to_fp32
    (ZeRO 1-3; plain module states for stage 0). One process, no engine; read-only (a broken
    tag is skipped with a warning, not moved)."""
    good, broken = candidates(ckpt_dir)
    for t, why in broken:
        log.warning("checkpoint %s/%s is broken (%s): skipped", ckpt_dir, t, why)
    if not good:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
    tag_dir = Path(ckpt_dir) / good[0]
    with safe_loads():
        if not any(tag_dir.glob("*optim_states.pt")):  # ZeRO stage 0: the module is whole
            import torch

            return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=good[0])


def require_finite(state: dict, where: str) -> None:
    """Raise NonFiniteWeights if any floating tensor holds NaN or inf."""
    import torch

    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise NonFiniteWeights(
            f"{where}: {len(bad)} of {len(state)} tensors hold NaN or inf (first: {bad[:3]}); not exported. "
            "The run diverged: resume from an earlier checkpoint with a lower lr, or check the data."
        )


def safe_globals() -> list:
    """The non-tensor types in this project's checkpoints: DeepSpeed's ZeRO stage enum, loss
    scaler and (ZeRO-1/2) fragment addresses; numpy arrays in the client state's RNG state."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    np_core = getattr(np, "_core", None) or np.core
    return [
        ZeroStageEnum,
        LossScaler,
        DynamicLossScaler,
        fragment_address,
        np_core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *(getattr(np.dtypes, n) for n in ("UInt32DType", "Float64DType") if hasattr(np, "dtypes")),
    ]


@contextlib.contextmanager
def safe_loads():
    """Inside: every torch.load (DeepSpeed's too) is weights_only=True, `safe_globals()` allowed."""
    import torch

    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_FREE = 16 * 2**20  # bytes: below this after a failed write, torch's nameless error is a full disk


@contextlib.contextmanager
def _naming_disk_full(ckpt_dir: Path, tag: str, record: dict | None):
    """Turn a save's failure into CheckpointDiskFull when the disk is full: an ENOSPC/EDQUOT
    OSError, or any error (torch's writer reports ENOSPC only as "basic_ios::clear: iostream
    error" or "file write failed") while less than what the tag still needs is free."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = _disk_full(e, ckpt_dir, tag, record)
        if full is None:
            raise
        raise full from e


def _disk_full(e: BaseException, ckpt_dir: Path, tag: str, record: dict | None) -> CheckpointDiskFull | None:
    free = _free_bytes(ckpt_dir)
    written = _tree_bytes(ckpt_dir / tag)
    previous = [t for t in tags(ckpt_dir) if t != tag and is_complete(ckpt_dir / t)]
    if previous:
        needed, basis = _tree_bytes(ckpt_dir / previous[-1]), f"the size of {previous[-1]}"
    elif record is not None:
        needed, basis = ckpt_record.estimate_bytes(record), "estimated from the model's parameters"
    else:
        needed, basis = None, None
    errnos = {getattr(x, "errno", None) for x in _chain(e)}
    if not errnos & set(FULL_ERRNOS) and free >= max((needed or 0) - written, LOW_FREE):
        return None
    need = f"about {_size(needed)} needed ({basis})" if needed is not None else "the size it needs is unknown"
    resume = f"{previous[-1]} stays the resume point" if previous else "no earlier checkpoint exists"
    return CheckpointDiskFull(
        f"no space left for checkpoint {ckpt_dir / tag}: {_size(free)} free on its filesystem, {need}; "
        f"{_size(written)} written when it failed ({type(e).__name__}: {e}). Nothing complete is lost: {resume}, "
        f"and {tag} (no marker) is deleted by the next save. Free space or lower train.keep_checkpoints, then rerun."
    )


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB ({n:,} bytes)"
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)" if n >= 2**20 else f"{n:,} bytes"


def _refuse_newer_complete(ckpt_dir: Path, step: int) -> None:
    newer = [t for t in tags(ckpt_dir) if step_of(t) > step and is_complete(ckpt_dir / t)]
    if newer:
        raise CheckpointError(
            f"saving step {step} into {ckpt_dir} would leave complete checkpoints newer than it ({newer}) "
            "to be pruned; refusing. Move them away (or delete them) to go back to an earlier step, or "
            "rerun to resume from the newest one."
        )


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Keep `keep` tags up to `current`; delete unfinished saves newer than it (no marker)."""
    current_step = step_of(current)
    older = [t for t in tags(ckpt_dir) if step_of(t) < current_step]
    newer = [t for t in tags(ckpt_dir) if step_of(t) > current_step]
    for name in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    for name in newer:
        if not is_complete(ckpt_dir / name):  # complete ones were refused before the save
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def _mark_complete(tag_dir: Path, record: dict | None = None, fp32_digest: str | None = None) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    files.pop(COMPLETE, None)
    marker = {"step": step_of(tag_dir.name), "files": files}
    if record is not None:
        marker["saved_with"] = record
    if fp32_digest is not None:
        marker["fp32_digest"] = fp32_digest
    text = json.dumps(marker, indent=1)
    text = re.sub(r"\[([\d,\s]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)  # a shape per line
    _write_atomic(tag_dir / COMPLETE, text + "\n")


def _set_aside(tag_dir: Path) -> None:
    dest, n = tag_dir.with_name(tag_dir.name + ".broken"), 1
    while dest.exists():
        dest, n = tag_dir.with_name(f"{tag_dir.name}.broken{n}"), n + 1
    if tag_dir.exists():
        tag_dir.rename(dest)


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
