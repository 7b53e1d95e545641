#!/usr/bin/env bash
# Builds a throw-away venv with the newest versions setup.cfg allows (not the lock) and runs the
# fast tests in it: the early warning that a dependency moved under us. Run it whenever you touch
# dependencies and record the date and versions in docs/DEPENDENCIES.md; CI keeps using the lock.
#   scripts/check-newest.sh [VENV_DIR] [pytest args...]   (default VENV_DIR: /tmp/atp-newest)
# The versions it tested are written to VENV_DIR/versions.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${1:-/tmp/atp-newest}
shift || true
rm -rf "$venv"
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# the project and its extras at the newest allowed versions; torch stays the pinned CPU wheel
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e '.[test,eval]'
"$venv/bin/pip" install -q --no-deps --upgrade 'lmms-eval>=0.7,<0.8'
"$venv/bin/pip" freeze --exclude-editable > "$venv/versions.txt"
grep -iE '^(torch|transformers|huggingface.hub|deepspeed|accelerate|tokenizers|safetensors|webdataset|omegaconf|filelock|datasets|lmms.eval)==' \
  "$venv/versions.txt" || true
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
# fast tests: the default suite without the local SLURM cluster
"$venv/bin/python" -m pytest tests -q -m "not slow and not slurm" "$@"
