#!/usr/bin/env bash
# Stops the local cluster in DIR ($ATP_SLURM_DIR, default /tmp/atp-slurm): kills its jobs
# (their slurmstepd outlive slurmd), then the daemons by the PIDs in their pidfiles,
# waits for them to go; a multi-node cluster's namespaces go last, with any process still
# in them (their tasks); removes everything but DIR/log. Every wait is bounded.
set -uo pipefail
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
export SLURM_CONF=$D/etc/slurm.conf
[ -f "$D/env.sh" ] && . "$D/env.sh"   # a multi-node cluster's client wrappers
ns=()
[ -f "$D/etc/netns" ] && mapfile -t ns < "$D/etc/netns"

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
# slurmd(s) and slurmctld first, munged last (they talk to it on the way out).
pidfiles=("$D"/run/slurmd*.pid "$D/run/slurmctld.pid" "$D/run/munged.pid")
for f in "${pidfiles[@]}"; do alive "$f" && kill -TERM "$(cat "$f")"; done
for f in "${pidfiles[@]}"; do
  for _ in $(seq 50); do alive "$f" || break; sleep 0.1; done
  if alive "$f"; then echo "stop.sh: $(basename "$f" .pid) did not stop, SIGKILL" >&2; kill -KILL "$(cat "$f")"; fi
done
# What is left in the nodes' namespaces (tasks of a job that outlived its slurmstepd) is this
# cluster's: kill it, then delete the namespaces (their veths and bridge go with them; the
# mount namespaces and their /dev/shm tmpfs end with their last process).
for n in "${ns[@]}"; do
  [ -e "/run/netns/$n" ] || continue
  for _ in $(seq 50); do
    pids=$(ip netns pids "$n" 2>/dev/null)
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null
    sleep 0.1
  done
  ip netns del "$n" || echo "stop.sh: could not delete network namespace $n" >&2
done
rm -rf "$D/state" "$D/spool" "$D/run" "$D/munge" "$D/munge-run" "$D/etc" "$D/env.sh" "$D/bin"
echo "stopped cluster in $D"
