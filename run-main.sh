#!/usr/bin/env bash
# Sets up .venv from nothing (first run only) and runs the main job on the embedded default:
# synthetic shards -> base (committed) -> projector -> ATP SFT (2-process DeepSpeed ZeRO-3,
# CPU/gloo) -> export -> variants -> eval (report in runs/default/eval).
# Extra arguments are key=value overrides, e.g. `./run-main.sh run_dir=runs/try2`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-env.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/torchrun --standalone --nproc_per_node "${NPROC:-2}" -m pipeline run pipeline/configs/default.yaml "$@"
