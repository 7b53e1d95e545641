#!/usr/bin/env bash
# Sets up .venv from nothing (first run only) and runs the default test suite.
# Extra arguments go to pytest, e.g. `./run-tests.sh -m slow` or `./run-tests.sh tests/test_model.py`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-env.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
