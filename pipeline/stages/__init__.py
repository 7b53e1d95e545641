"""The stage registry: name -> "module:function". Adding a stage is one entry here (and
its name in a config's `stages` list). Entries are strings so that listing the stages
(config checks, the CLI) imports nothing heavy.

A stage function is `run(run: RunConfig, ctx: Context, out: Path) -> bool`: called on
every rank, it writes into `out` (= run_dir/NAME) and returns True when its output is
complete, False when it stopped early on a signal (the runner then exits 0 without the
later stages). The runner marks a complete stage with `out/DONE` and skips it next time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = {
    "shards": "pipeline.stages.shards:run",  # synthetic shards for the embedded default
    "base": "pipeline.stages.base:run",  # the embedded default's tiny LLaVA, trained from scratch
    "projector": "pipeline.stages.projector:run",
    "sft": "pipeline.stages.sft:run",
    "export": "pipeline.stages.export:run",
    "variants": "pipeline.stages.variants:run",  # the trained comparison models of `eval`
    "eval": "pipeline.stages.eval:run",
}
DONE = "DONE"


@dataclass
class Context:
    dist: Any  # pipeline.distributed.DistInfo
    stop: Any  # pipeline.distributed.StopSignal


def load(name: str):
    import importlib

    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)
