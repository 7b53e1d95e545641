#!/usr/bin/env bash
# Installs the Debian packages of a single-node SLURM cluster (Slurm 22.05 on Debian 12).
# Idempotent: returns at once when they are there. Needs root; nothing starts by itself
# (no systemd here), start.sh starts the daemons.
set -euo pipefail
pkgs=(slurmctld slurmd slurm-client munge)
if command -v slurmctld slurmd sbatch munged >/dev/null 2>&1 \
   && [ "$(command -v slurmctld slurmd sbatch munged | wc -l)" = 4 ]; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "install.sh: needs root (apt-get)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
# Try the cached package lists first; update only when they are stale or missing.
apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; }
