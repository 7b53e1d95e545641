#!/usr/bin/env bash
# Checks a started local cluster: node states and a one-task-per-node srun that prints each
# node's hostname and address as its tasks see them.
set -euo pipefail
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
. "$D/env.sh"
sinfo -N
n=$(sinfo -h -N | wc -l)
timeout 60 srun -N"$n" --ntasks-per-node=1 --quiet --label sh -c 'echo "$(hostname) $(hostname -i 2>/dev/null)"'
