#!/usr/bin/env bash
# Stop the cluster started by start.sh from the same STATE_DIR: cancel its jobs, then end munged,
# slurmctld and the slurmd daemons by the PIDs in their pid files (never by name), and remove
# the network namespaces and bridge it made. The state folder stays for reading the logs.
#
#   slurm/local-cluster/stop.sh [STATE_DIR]      default STATE_DIR: .cache/slurm-cluster
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin
STATE=$(realpath -m "${1:-$HERE/../../.cache/slurm-cluster}")
[ -d "$STATE" ] || {
  echo "local-cluster: no cluster state in $STATE" >&2
  exit 0
}
export SLURM_CONF=$STATE/etc/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/run/slurmctld.pid"; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi
stop_pid_file() {
  local file=$1 pid
  alive "$file" || return 0
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null
}
for file in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
  stop_pid_file "$file"
done
if [ -f "$STATE/run/netns" ]; then
  while read -r ns; do ip netns del "$ns" 2>/dev/null; done <"$STATE/run/netns"
  rm -f "$STATE/run/netns"
fi
if [ -f "$STATE/run/bridge" ]; then
  ip link del "$(cat "$STATE/run/bridge")" 2>/dev/null
  rm -f "$STATE/run/bridge"
fi
echo "local SLURM cluster in $STATE stopped"
