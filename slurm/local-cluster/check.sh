#!/usr/bin/env bash
# Checks a started local cluster: partition/node state and a 1-task srun.
set -euo pipefail
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
export SLURM_CONF=${SLURM_CONF:-$D/etc/slurm.conf}
sinfo
timeout 60 srun -N1 -n1 --quiet hostname
