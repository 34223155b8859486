#!/usr/bin/env bash
# Submit slurm/dist-llm.sbatch with its parameters as options; prints the job id.
#
#   slurm/submit.sh [--nodes N] [--gpus-per-node G] [--nproc-per-node P] [--cpus-per-task C]
#                   [--time T] [--partition P] [--account A] [--grace S] [--log-dir D]
#                   [--job-name NAME] [--sbatch-arg ARG]... [--dry-run]  STAGE [STAGE ARGS...]
#
#   slurm/submit.sh --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --partition gpu \
#       train --config configs/quickstart.yaml train.steps=20000
#
# --gpus-per-node 0 (the default) runs on CPUs with --nproc-per-node processes per node (default
# 1). --grace: seconds between the preemption/time-limit warning (USR1) and the kill (default
# 120; more than one step plus one checkpoint save). Logs: LOG_DIR/NAME-JOBID.out, appended to by
# requeued runs. train/distill configs are checked here first (`dist-llm config show`), so a typo
# fails in a second instead of after the queue wait.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NODES=1 GPUS=0 NPROC="" CPUS="" TIME=04:00:00 PARTITION="" ACCOUNT="" GRACE=120 LOG_DIR=logs NAME=dist-llm
DRY=0
EXTRA=()
usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "submit.sh: $1 needs a value" >&2 && exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
  --nodes) need "$@"; NODES=$2; shift 2 ;;
  --gpus-per-node) need "$@"; GPUS=$2; shift 2 ;;
  --nproc-per-node) need "$@"; NPROC=$2; shift 2 ;;
  --cpus-per-task) need "$@"; CPUS=$2; shift 2 ;;
  --time) need "$@"; TIME=$2; shift 2 ;;
  --partition) need "$@"; PARTITION=$2; shift 2 ;;
  --account) need "$@"; ACCOUNT=$2; shift 2 ;;
  --grace) need "$@"; GRACE=$2; shift 2 ;;
  --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
  --job-name) need "$@"; NAME=$2; shift 2 ;;
  --sbatch-arg) need "$@"; EXTRA+=("$2"); shift 2 ;;
  --dry-run) DRY=1; shift ;;
  -h | --help) usage ;;
  -*) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  *) break ;;
  esac
done
[ $# -ge 1 ] || usage
for value in "$NODES" "$GPUS" "$GRACE" ${NPROC:+"$NPROC"} ${CPUS:+"$CPUS"}; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "submit.sh: '$value' is not a whole number" >&2 && exit 2; }
done
PYTHON=${DIST_LLM_PYTHON:-$(command -v python3 || command -v python)}
# The distributed stages (train, distill, dpo, from the stage registry) take a config: check it here.
DISTRIBUTED=$("$PYTHON" -m dist_llm.stages --distributed)
if grep -qxF -e "$1" <<<"$DISTRIBUTED"; then
  args=("${@:2}")
  "$PYTHON" -m dist_llm config show "${args[@]}" >/dev/null
fi

mkdir -p "$LOG_DIR"
cmd=(sbatch --parsable --job-name="$NAME" --nodes="$NODES" --ntasks-per-node=1 --time="$TIME"
  --output="$(realpath "$LOG_DIR")/%x-%j.out" --open-mode=append --signal="B:USR1@$GRACE" --requeue)
if [ "$GPUS" -gt 0 ]; then
  cmd+=(--gpus-per-node="$GPUS")
  [ -n "$NPROC" ] && cmd+=(--export="ALL,DIST_LLM_NPROC_PER_NODE=$NPROC")
else
  cmd+=(--export="ALL,DIST_LLM_NPROC_PER_NODE=${NPROC:-1}")
fi
[ -n "$CPUS" ] && cmd+=(--cpus-per-task="$CPUS")
[ -n "$PARTITION" ] && cmd+=(--partition="$PARTITION")
[ -n "$ACCOUNT" ] && cmd+=(--account="$ACCOUNT")
cmd+=("${EXTRA[@]}" "$HERE/dist-llm.sbatch" "$@")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
job=$("${cmd[@]}")
echo "submitted job $job: log $(realpath "$LOG_DIR")/$NAME-$job.out" >&2
echo "$job"
