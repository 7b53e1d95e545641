#!/usr/bin/env bash
# Starts a real single-node SLURM cluster (munged, slurmctld, slurmd) whose config, key,
# state, logs and pidfiles all live in one scratch folder; waits until the node is idle.
#   slurm/local-cluster/start.sh [DIR]        DIR: $ATP_SLURM_DIR, default /tmp/atp-slurm
# Ports: $ATP_SLURM_CTLD_PORT (6817) and $ATP_SLURM_D_PORT (6818); to run a second cluster
# beside this one pick others, and a first job id ($ATP_SLURM_FIRST_JOB_ID, 1) far from this
# one's: a job's MASTER_PORT is 15000 + job id % 20000 (slurm/launch.sh), so two clusters that
# both number from 1 give their jobs the same port. Prints the export clients need (also in DIR/env.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
ctld_port=${ATP_SLURM_CTLD_PORT:-6817}
d_port=${ATP_SLURM_D_PORT:-6818}
first_job_id=${ATP_SLURM_FIRST_JOB_ID:-1}
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root (SlurmUser=root, munged)" >&2; exit 1; }

# A previous cluster in DIR: stop it; then start from empty state (slurmctld would
# otherwise recover its old jobs).
[ -d "$D/run" ] && "$here/stop.sh" "$D" >/dev/null 2>&1 || true
rm -rf "$D/state" "$D/spool" "$D/run" "$D/munge" "$D/munge-run"
mkdir -p "$D"/{etc,state,spool,log,run,munge,munge-run}
chmod 755 "$D" "$D/munge-run"   # munged refuses a socket folder others cannot traverse
chmod 700 "$D/munge"
D=$(cd "$D" && pwd)
conf=$D/etc/slurm.conf
sock=$D/munge-run/munge.socket

dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$D/munge/munge.key"
munged --force --key-file="$D/munge/munge.key" --socket="$sock" \
  --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
munge -S "$sock" -n | unmunge -S "$sock" >/dev/null   # fails loudly if munged is not usable

host=$(hostname -s)
# The node line as slurmd measures it (CPUs, sockets, cores, memory): a hand-written
# one gets a socket/core mismatch warning and may drain the node.
node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/")
cat > "$conf" <<CONF
ClusterName=atp-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
FirstJobId=$first_job_id
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job (EligibleTime = requeue + cred_expire + 1, default
# 120 s); 10 s is still ample for a step launch on this machine.
AuthInfo=socket=$sock,cred_expire=10
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
# No cgroups, no accounting daemon, no MPI plugin: all a one-machine test cluster needs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Schedule every second (defaults: 60 s main loop, 30 s backfill), so a requeued job starts
# as soon as it is eligible.
SchedulerParameters=sched_interval=1,bf_interval=1
# Seconds between SIGTERM and SIGKILL on scancel/timeout: room to save a checkpoint.
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$conf
slurmctld
slurmd
for _ in $(seq 100); do
  [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
  sleep 0.2
done
state=$(sinfo -h -o %T 2>/dev/null || true)
[ "$state" = idle ] || { echo "start.sh: node state '$state', see $D/log" >&2; exit 1; }
echo "export SLURM_CONF=$conf" > "$D/env.sh"
echo "export SLURM_CONF=$conf"
