"""The stage registry: name -> "module:function". Adding a stage is one entry here, its name
in `pipeline.core.config.StageName` (the config's closed choice; this module refuses to import
when the two differ) and in a config's `stages` list. Entries are strings so that listing the
stages imports nothing heavy.

A stage function is `run(run: RunConfig, ctx: Context, out: Path) -> bool`: called on
every rank, it writes into `out` (= run_dir/NAME) and returns True when its output is
complete, False when it stopped early on a signal (the runner then exits 0 without the
later stages). The runner marks a complete stage with `out/DONE` and skips it next time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pipeline.core.config import ConfigError, StageName

STAGES = {
    "shards": "pipeline.stages.shards:run",  # synthetic shards for the embedded default
    "base": "pipeline.stages.base:run",  # the embedded default's tiny LLaVA, trained from scratch
    "projector": "pipeline.stages.projector:run",
    "sft": "pipeline.stages.sft:run",
    "export": "pipeline.stages.export:run",
    "variants": "pipeline.stages.variants:run",  # the trained comparison models of `eval`
    "eval": "pipeline.stages.eval:run",
}
if tuple(STAGES) != get_args(StageName):
    raise ImportError(f"pipeline.stages.STAGES {tuple(STAGES)} != pipeline.core.config.StageName {get_args(StageName)}")
DONE = "DONE"  # the marker of a complete stage (or variant part) directory


@dataclass
class Context:
    dist: Any  # pipeline.core.distributed.DistInfo
    stop: Any  # pipeline.core.distributed.StopSignal


def check_names(names, key: str = "stages") -> None:
    """The check of a stage name given on the command line (`python -m pipeline stage NAME`);
    the config's `stages` are checked by their schema type."""
    for i, name in enumerate(names):
        if name not in STAGES:
            raise ConfigError(f"config error at '{key}[{i}]': unknown stage {name!r}; known: {sorted(STAGES)}")


def is_done(d: Path) -> bool:
    return (Path(d) / DONE).exists()


def mark_done(d: Path, text: str = "") -> None:
    """Rank 0 marks `d` complete."""
    from pipeline.core.distributed import rank

    if rank() == 0:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / DONE).write_text(text)


def require_done(d: Path, who: str) -> Path:
    """`d`, which stage `who` starts from; it must be complete."""
    if not is_done(d):
        raise FileNotFoundError(f"{who} starts from {d}, which is not complete: run the {Path(d).name} stage first")
    return Path(d)


def load(name: str):
    import importlib

    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)
