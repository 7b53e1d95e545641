#!/usr/bin/env bash
# Starts a real SLURM cluster on this machine (munged, slurmctld, one slurmd per node) whose
# config, key, state, logs and pidfiles all live in one scratch folder; waits until every
# node is idle.
#   slurm/local-cluster/start.sh [DIR]        DIR: $ATP_SLURM_DIR, default /tmp/atp-slurm
#   ATP_SLURM_NODES=2 slurm/local-cluster/start.sh [DIR]    two (or more) nodes, see below
# Prints the export clients need (also in DIR/env.sh: `. DIR/env.sh`).
#
# One node (the default): the daemons run on this host, node name `hostname -s`, 127.0.0.1.
# Ports: $ATP_SLURM_CTLD_PORT (6817) and $ATP_SLURM_D_PORT (6818); to run a second cluster
# beside this one pick others, and a first job id ($ATP_SLURM_FIRST_JOB_ID, 1) far from this
# one's: a job's MASTER_PORT is 15000 + job id % 20000 (slurm/launch.sh), so two clusters that
# both number from 1 give their jobs the same port.
#
# N nodes (ATP_SLURM_NODES=N >= 2): node1..nodeN, each a network namespace of its own
# (`ip netns`, named atp-<hash of DIR>-nodeI) with its own hostname (UTS namespace), /etc/hosts
# and /dev/shm (a mount namespace with a private tmpfs), its own slurmd, and the address
# 10.213.0.I on a bridge in node1's namespace. Nothing is added to this host's own network:
# the namespaces have no route beyond 10.213.0.0/24, so their traffic stays between them
# (and each one's loopback). slurmctld runs on node1 (the head node); clients reach it through
# wrappers in DIR/bin that enter node1's network namespace (env.sh puts them first on PATH).
# Each node declares $ATP_SLURM_CPUS CPUs (default 4; the nodes share this host's cores), so
# one node can also hold a 4-task job. stop.sh removes the namespaces and all in them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
D=${1:-${ATP_SLURM_DIR:-/tmp/atp-slurm}}
ctld_port=${ATP_SLURM_CTLD_PORT:-6817}
d_port=${ATP_SLURM_D_PORT:-6818}
first_job_id=${ATP_SLURM_FIRST_JOB_ID:-1}
nodes=${ATP_SLURM_NODES:-1}
cpus=${ATP_SLURM_CPUS:-4}
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root (SlurmUser=root, munged, namespaces)" >&2; exit 1; }
[[ $nodes =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: ATP_SLURM_NODES must be 1..99, not '$nodes'" >&2; exit 2; }

# A previous cluster in DIR: stop it; then start from empty state (slurmctld would
# otherwise recover its old jobs).
[ -d "$D/run" ] && "$here/stop.sh" "$D" >/dev/null 2>&1 || true
rm -rf "$D/state" "$D/spool" "$D/run" "$D/munge" "$D/munge-run" "$D/bin"
mkdir -p "$D"/{etc,state,spool,log,run,munge,munge-run}
chmod 755 "$D" "$D/munge-run"   # munged refuses a socket folder others cannot traverse
chmod 700 "$D/munge"
D=$(cd "$D" && pwd)
# A start that fails halfway stops what it started (the logs stay in DIR/log).
trap 'echo "start.sh: failed (line $LINENO); see $D/log" >&2; "$here/stop.sh" "$D" >/dev/null 2>&1' ERR
conf=$D/etc/slurm.conf
sock=$D/munge-run/munge.socket

# One munged for all nodes: its socket is a path, which every network namespace can reach.
dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$D/munge/munge.key"
munged --force --key-file="$D/munge/munge.key" --socket="$sock" \
  --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
munge -S "$sock" -n | unmunge -S "$sock" >/dev/null   # fails loudly if munged is not usable

if [ "$nodes" = 1 ]; then
  host=$(hostname -s)
  ctld_host="$host(127.0.0.1)"
  # The node line as slurmd measures it (CPUs, sockets, cores, memory): a hand-written
  # one gets a socket/core mismatch warning and may drain the node.
  node_lines="$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/") State=UNKNOWN"
  slurmd_files="SlurmdPidFile=$D/run/slurmd.pid
SlurmdLogFile=$D/log/slurmd.log
SlurmdSpoolDir=$D/spool"
else
  command -v ip unshare nsenter >/dev/null || { echo "start.sh: needs ip (iproute2), unshare and nsenter" >&2; exit 1; }
  tag=$(printf %s "$D" | sha1sum | cut -c1-8)
  net=10.213.0
  mem=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  ctld_host="node1($net.1)"
  node_lines=""
  printf '127.0.0.1 localhost\n' > "$D/etc/hosts"
  : > "$D/etc/netns"
  for i in $(seq "$nodes"); do
    echo "atp-$tag-node$i" >> "$D/etc/netns"
    echo "$net.$i node$i" >> "$D/etc/hosts"
    # config_overrides (below) makes slurmd accept more CPUs than it counts.
    node_lines+="NodeName=node$i NodeAddr=$net.$i CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$((mem / nodes)) State=UNKNOWN
"
  done
  # %n: the node's name, so the slurmds of one config keep their files apart.
  slurmd_files="SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmdSpoolDir=$D/spool/%n
SlurmdParameters=config_overrides"
fi

cat > "$conf" <<CONF
ClusterName=atp-local
SlurmctldHost=$ctld_host
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
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmctldLogFile=$D/log/slurmctld.log
$slurmd_files
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
${node_lines%$'\n'}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$conf

if [ "$nodes" = 1 ]; then
  slurmctld
  slurmd
  echo "export SLURM_CONF=$conf" > "$D/env.sh"
else
  mapfile -t ns < "$D/etc/netns"
  for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done
  # The fabric: a bridge in node1's namespace, one veth pair per node (both ends created
  # inside namespaces, so no interface ever appears in this host's own).
  ip -n "${ns[0]}" link add br0 type bridge
  ip -n "${ns[0]}" addr add "$net.1/24" dev br0
  ip -n "${ns[0]}" link set br0 up
  for i in $(seq 2 "$nodes"); do
    ip link add eth0 netns "${ns[i - 1]}" type veth peer name "veth$i" netns "${ns[0]}"
    ip -n "${ns[0]}" link set "veth$i" master br0 up
    ip -n "${ns[i - 1]}" addr add "$net.$i/24" dev eth0
    ip -n "${ns[i - 1]}" link set eth0 up
  done
  # Clients: wrappers that run the real command in node1's network namespace.
  mkdir -p "$D/bin"
  for c in sbatch srun salloc squeue scancel scontrol sinfo sattach sstat; do
    real=$(command -v "$c") || continue
    printf '#!/bin/sh\nexec nsenter --net=/run/netns/%s %s "$@"\n' "${ns[0]}" "$real" > "$D/bin/$c"
    chmod 755 "$D/bin/$c"
  done
  # Each node: its namespaces, hostname, /etc/hosts and /dev/shm, then its daemons (which
  # fork into the background and keep the namespaces alive). node1 also runs slurmctld.
  for i in $(seq "$nodes"); do
    daemons="slurmd"
    [ "$i" = 1 ] && daemons="slurmctld slurmd"
    mkdir -p "$D/spool/node$i"
    # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mount slurmd reads.
    nsenter --net="/run/netns/${ns[i - 1]}" unshare --uts --mount --propagation private -- sh -ec '
      hostname "$1"
      mount --bind "$2" /etc/hosts
      mount -t tmpfs -o mode=1777 "shm-$1" /dev/shm
      shift 2
      for d in "$@"; do "$d"; done' sh "node$i" "$D/etc/hosts" $daemons
  done
  echo "export SLURM_CONF=$conf PATH=$D/bin:\$PATH" > "$D/env.sh"
fi

. "$D/env.sh"
for _ in $(seq 150); do
  [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$')" = "$nodes" ] && break
  sleep 0.2
done
state=$(sinfo -h -N -o '%N=%T' 2>/dev/null | tr '\n' ' ' || true)
[ "$(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$')" = "$nodes" ] \
  || { echo "start.sh: nodes not idle: '$state', see $D/log" >&2; exit 1; }
cat "$D/env.sh"
