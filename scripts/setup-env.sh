#!/usr/bin/env bash
# Creates .venv and installs the project into it, from nothing. Idempotent: reinstalls
# only when setup.cfg changed. torch is installed first and pinned so that nothing
# pulls a CUDA build (torch==2.13.0 resolves to the local CPU wheel on the project machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.atp-installed
want=$(sha256sum setup.cfg | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test,eval]'
  # lmms-eval without its declared dependencies: setup.cfg's `eval` extra lists what it needs
  .venv/bin/pip install -q --no-deps 'lmms-eval>=0.7,<0.8'
  echo "$want" > "$stamp"
fi
