#!/usr/bin/env bash
# Stops the local cluster in DIR ($ATP_SLURM_DIR, default /tmp/atp-slurm): kills its jobs
# (their slurmstepd outlive slurmd), then the daemons by the PIDs in their pidfiles,
# waits for them to go, and removes everything but DIR/log.
set -uo pipefail
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
export SLURM_CONF=$D/etc/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$D/run/slurmctld.pid"; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    timeout 10 scancel --full --signal=KILL $jobs 2>/dev/null
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi
for d in slurmd slurmctld munged; do
  f=$D/run/$d.pid
  alive "$f" && kill -TERM "$(cat "$f")"
done
for d in slurmd slurmctld munged; do
  f=$D/run/$d.pid
  for _ in $(seq 50); do alive "$f" || break; sleep 0.1; done
  if alive "$f"; then echo "stop.sh: $d did not stop, SIGKILL" >&2; kill -KILL "$(cat "$f")"; fi
done
rm -rf "$D/state" "$D/spool" "$D/run" "$D/munge" "$D/munge-run" "$D/etc" "$D/env.sh"
echo "stopped cluster in $D"
