"""lmms-eval (0.7.x) for exported ATP-LLaVA checkpoints.

- `pipeline.eval.lmms.model.AtpLlavaLmms`: the model plugin (`--model atp_llava`), registered
  through the entry-point group lmms-eval 0.7 reads, `lmms_eval.models` (setup.cfg
  `[options.entry_points]` -> `manifests()` below); lmms-eval loads it with
  `importlib.metadata.entry_points(group="lmms_eval.models")` when `lmms_eval.models` is
  imported, so nothing is copied into lmms-eval and no LMMS_EVAL_PLUGINS variable is needed.
- `pipeline/eval/lmms/tasks/`: offline copies of the seven paper benchmarks (local parquet files).
- `pipeline.eval.lmms.synthetic`: the embedded synthetic eval shards as two local tasks.
- `python -m pipeline.eval.lmms ...`: runs lmms-eval and fails loudly when it did not finish.

This module imports only lmms-eval's registry (no torch), as entry points are loaded eagerly.
"""

from __future__ import annotations

MODEL_ID = "atp_llava"


def manifests():
    """The `lmms_eval.models` entry point's payload."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID, simple_class_path="pipeline.eval.lmms.model.AtpLlavaLmms", aliases=("atp-llava",)
        )
    ]
