#!/usr/bin/env bash
# Refreshes requirements.lock, the exact package set that scripts/setup-env.sh installs and CI
# tests: setup.cfg's install_requires plus its `test`, `eval` and `lint` extras, resolved by pip-tools.
# pip-compile keeps the versions already in the lock; pass its flags to move them:
#   scripts/lock.sh                         # add/remove what setup.cfg changed, keep the rest
#   scripts/lock.sh --upgrade               # everything to the newest that setup.cfg allows
#   scripts/lock.sh -P transformers==5.24.0 # one package
# pip (not uv) resolves, so torch==2.13.0 comes from this machine's local CPU wheel (+cpu).
# lmms-eval is not in the lock: it goes in with --no-deps (LMMS_EVAL in scripts/setup-env.sh).
# After a refresh: run ./run-tests.sh from a clean clone and record the set in docs/DEPENDENCIES.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tools=.lock-venv
[ -x $tools/bin/pip-compile ] || { "$PY" -m venv $tools && $tools/bin/pip install -q pip-tools==7.6.2; }
$tools/bin/pip-compile -q --extra test --extra eval --extra lint --strip-extras --no-emit-index-url \
  --no-emit-find-links -o requirements.lock "$@" setup.cfg
