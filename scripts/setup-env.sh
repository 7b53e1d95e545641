#!/usr/bin/env bash
# Creates .venv and installs the project into it, from nothing, with exactly the package set of
# requirements.lock (the set CI tests; refresh it with scripts/lock.sh). Idempotent: reinstalls
# only when setup.cfg, the lock or this script changed. The lock pins torch==2.13.0+cpu, the local
# CPU wheel, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# lmms-eval goes in without its declared dependencies: they pull torchvision (transformers' image
# processors then switch backend), opencv, wandb and a CUDA torch. setup.cfg's `eval` extra
# declares what its imports need.
LMMS_EVAL=lmms-eval==0.7.3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.atp-installed
want=$(cat setup.cfg requirements.lock scripts/setup-env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/pip install -q --no-deps "$LMMS_EVAL"
  echo "$want" > "$stamp"
fi
