#!/usr/bin/env bash
# Body of train.sbatch / eval.sbatch, run inside the batch job (sbatch copies only the
# .sbatch file to its spool, so this one is found through the submit dir / $ATP_REPO).
#   launch.sh [run | stage NAME] CONFIG [key=value ...]
# Runs `srun PY -m pipeline ... CONFIG ... run_dir=RUN_DIR`, one task per GPU (or CPU
# task), then requeues the job when the pipeline left RUN_DIR/.preempted (contract in
# slurm/README.md). Environment knobs:
#   ATP_RUN_DIR      run dir (default: a run_dir=... argument, else runs/$SLURM_JOB_NAME)
#   ATP_PYTHON       interpreter (default: the repo's .venv/bin/python, else python3)
#   ATP_ENTRY        what follows the interpreter (default "-m pipeline")
set -euo pipefail
repo=${ATP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$repo"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "launch.sh: run it through sbatch" >&2; exit 2; }

cmd=(stage sft)
case "${1:-}" in
  run) cmd=(run); shift ;;
  stage) cmd=(stage "$2"); shift 2 ;;
esac
[ $# -ge 1 ] || { echo "usage: sbatch slurm/train.sbatch [run | stage NAME] CONFIG [key=value ...]" >&2; exit 2; }

# The run dir is one of the overrides, so the pipeline and this script agree on it.
run_dir=${ATP_RUN_DIR:-}
for a in "$@"; do [[ $a == run_dir=* ]] && run_dir=${a#run_dir=}; done
run_dir=${run_dir:-runs/$SLURM_JOB_NAME}
mkdir -p "$run_dir/logs"
log=$run_dir/logs/slurm-$SLURM_JOB_ID.log
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): log in $log"
exec >>"$log" 2>&1   # per job in the run dir; appended across requeues (same job id)

py=${ATP_PYTHON:-}
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=$repo/.venv/bin/python || py=python3; }
read -r -a entry <<<"${ATP_ENTRY:--m pipeline}"

# Rendezvous: first node of the job, a port derived from the job id (same formula as
# pipeline.core.distributed.port_from_job_id; stable across requeues). pipeline.core.distributed
# maps the per-task SLURM variables to RANK/WORLD_SIZE/LOCAL_RANK itself.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
export ATP_REQUEUE_BY=sbatch   # this script requeues, not the pipeline
[ "${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}" != 0 ] || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

# The tasks get USR1 from slurmstepd; should someone submit with --signal=B:USR1, keep this
# shell alive (bash's default for USR1 is to die) instead of losing the requeue step.
trap 'echo "$(date +%s.%N) batch shell got USR1; use --signal=USR1@N (no B:) to reach the tasks"' USR1
rm -f "$run_dir/.preempted"
echo "$(date +%s.%N) start: nodes=$SLURM_JOB_NODELIST tasks=$SLURM_NTASKS master=$MASTER_ADDR:$MASTER_PORT restart=${SLURM_RESTART_COUNT:-0}"
rc=0
# 22.05's srun does not inherit --cpus-per-task from sbatch; --kill-on-bad-exit: one
# failed rank ends the step instead of leaving the others hanging in a collective.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --label \
  "$py" "${entry[@]}" "${cmd[@]}" "$@" "run_dir=$run_dir" || rc=$?
echo "$(date +%s.%N) srun exit $rc"
if [ "$rc" = 0 ] && [ -f "$run_dir/.preempted" ]; then
  echo "$(date +%s.%N) preempted: scontrol requeue $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
