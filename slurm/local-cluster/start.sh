#!/usr/bin/env bash
# Start a real two-node SLURM cluster on this machine: munged + slurmctld + two slurmd (node1,
# node2), for trying the sbatch scripts and for the test suite. Needs root and Debian's
# `slurmctld slurmd slurm-client munge` (apt-get install -y ...). Stop it with stop.sh.
#
#   slurm/local-cluster/start.sh [STATE_DIR]     default STATE_DIR: .cache/slurm-cluster
#   . STATE_DIR/env.sh                           SLURM_CONF and the sacct stand-in for this shell
#
# Each node gets its own network namespace, address and hostname (10.213.X.11/.12 behind a
# bridge at 10.213.X.1) where the machine allows it; otherwise both slurmd run on 127.0.0.1 with
# different ports. Set LOCAL_CLUSTER_MODE=netns or loopback to insist on one. Everything (config,
# munge key and socket, state, spool, logs, pid files) lives in STATE_DIR; a previous cluster's
# state there is wiped, and FirstJobId is fresh on every start (LOCAL_CLUSTER_FIRST_JOB_ID to
# choose), so job ids of different starts do not collide.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin
STATE=$(realpath -m "${1:-$HERE/../../.cache/slurm-cluster}")
MODE=${LOCAL_CLUSTER_MODE:-auto}
NODES=(node1 node2)
CPUS=${LOCAL_CLUSTER_CPUS:-2}
GPUS=2 # fake GPUs per node: character devices, so that --gpus-per-node works as on a GPU cluster

die() {
  echo "local-cluster: $*" >&2
  exit 1
}
for tool in munged slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y slurmctld slurmd slurm-client munge"
done
[ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their user; munged and namespaces need root)"
for pidfile in "$STATE"/run/*.pid; do
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "a cluster is already running from $STATE ($pidfile); run stop.sh $STATE first"
  fi
done

rm -rf "$STATE"
trap 'status=$?; [ $status = 0 ] || "$HERE/stop.sh" "$STATE" >/dev/null 2>&1; exit $status' EXIT
mkdir -p "$STATE"/{etc,munge,state,spool,run,log,dev,tmp}
chmod 755 "$STATE" "$STATE/munge"
HOST=$(hostname -s)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port)
FIRST_JOB_ID=${LOCAL_CLUSTER_FIRST_JOB_ID:-$(((RANDOM * 32768 + RANDOM) % 50000000 + 1000))}

# ---------------------------------------------------------------- network
TAG=$(printf '%s' "$STATE" | sha1sum | cut -c1-4)
BRIDGE="dllm${TAG}br"
netns_up() {
  local n=$(((16#$TAG % 200) + 20)) i
  while ip -o -4 addr | grep -q " 10\.213\.$n\."; do n=$((n + 1)); done
  SUBNET=10.213.$n
  ip link add "$BRIDGE" type bridge || return 1
  echo "$BRIDGE" >"$STATE/run/bridge"
  ip addr add "$SUBNET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
  for i in "${!NODES[@]}"; do
    local ns="dllm-$TAG-${NODES[$i]}" veth="dl${TAG}n$((i + 1))"
    ip netns add "$ns" || return 1
    echo "$ns" >>"$STATE/run/netns"
    ip link add "$veth" type veth peer name eth0 netns "$ns" || return 1
    ip link set "$veth" master "$BRIDGE" && ip link set "$veth" up || return 1
    ip -n "$ns" addr add "$SUBNET.$((11 + i))/24" dev eth0 || return 1
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up || return 1
  done
  # nsenter (not `ip netns exec`, which hides the cgroup mounts slurmd needs) and a private
  # hostname per node must work too.
  nsenter --net="/run/netns/dllm-$TAG-node1" unshare --uts --mount true || return 1
  # and a node must reach the host side of the bridge (where slurmctld listens)
  python3 - "$SUBNET.1" "/run/netns/dllm-$TAG-node1" <<'PY' || return 1
import socket, subprocess, sys
with socket.create_server((sys.argv[1], 0)) as server:
    port = server.getsockname()[1]
    code = f"import socket; socket.create_connection(({sys.argv[1]!r}, {port}), timeout=5).close()"
    subprocess.run(["nsenter", f"--net={sys.argv[2]}", sys.executable, "-c", code], check=True, timeout=10)
PY
}
netns_down() {
  if [ -f "$STATE/run/netns" ]; then
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done <"$STATE/run/netns"
  fi
  [ -f "$STATE/run/bridge" ] && ip link del "$(cat "$STATE/run/bridge")" 2>/dev/null
  rm -f "$STATE/run/netns" "$STATE/run/bridge"
}
if [ "$MODE" != loopback ]; then
  if command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null &&
    netns_up 2>"$STATE/log/netns.log"; then
    MODE=netns
  else
    netns_down
    [ "$MODE" = netns ] && die "network namespaces do not work here: $(cat "$STATE/log/netns.log")"
    MODE=loopback
  fi
fi

# ---------------------------------------------------------------- configuration
if [ "$MODE" = netns ]; then
  CTLD_ADDR=$SUBNET.1
  {
    echo "127.0.0.1 localhost"
    echo "$CTLD_ADDR $HOST"
    for i in "${!NODES[@]}"; do echo "$SUBNET.$((11 + i)) ${NODES[$i]}"; done
  } >"$STATE/etc/hosts"
else
  CTLD_ADDR=127.0.0.1
fi
GRES_LINE=""
if for g in $(seq 0 $((GPUS - 1))); do mknod "$STATE/dev/gpu$g" c 1 3 || exit 1; done 2>/dev/null; then
  GRES_LINE="Gres=gpu:$GPUS"
  echo "NodeName=$(IFS=,; echo "${NODES[*]}") Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]" >"$STATE/etc/gres.conf"
else
  : >"$STATE/etc/gres.conf"
fi
{
  cat <<EOF
# Written by slurm/local-cluster/start.sh ($MODE mode); removed by the next start.
ClusterName=distllm
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
TmpFS=$STATE/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
KillWait=10
JobRequeue=1
FirstJobId=$FIRST_JOB_ID
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
GresTypes=gpu
EOF
  for i in "${!NODES[@]}"; do
    if [ "$MODE" = netns ]; then
      echo "NodeName=${NODES[$i]} NodeAddr=$SUBNET.$((11 + i)) CPUs=$CPUS RealMemory=4000 $GRES_LINE State=UNKNOWN"
    else
      echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$CPUS RealMemory=4000 $GRES_LINE State=UNKNOWN"
    fi
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} >"$STATE/etc/slurm.conf"
printf 'CgroupPlugin=autodetect\nIgnoreSystemdOnFailure=yes\n' >"$STATE/etc/cgroup.conf"
export SLURM_CONF=$STATE/etc/slurm.conf
cat >"$STATE/env.sh" <<EOF
# . this file: client commands (sbatch, squeue, scontrol, sacct stand-in) then talk to the cluster in $STATE
export SLURM_CONF=$SLURM_CONF
export PATH=$HERE/bin:\$PATH
EOF

# ---------------------------------------------------------------- daemons
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
  --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
slurmctld -f "$SLURM_CONF"
for i in "${!NODES[@]}"; do
  node=${NODES[$i]}
  mkdir -p "$STATE/spool/$node"
  if [ "$MODE" = netns ]; then
    nsenter --net="/run/netns/dllm-$TAG-$node" unshare --uts --mount sh -c \
      "hostname $node && mount --bind '$STATE/etc/hosts' /etc/hosts && exec slurmd -N $node -f '$SLURM_CONF'"
  else
    slurmd -N "$node" -f "$SLURM_CONF"
  fi
done

for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" = "${#NODES[@]}" ] && break
  sleep 0.3
done
if [ "$idle" != "${#NODES[@]}" ]; then
  sinfo -N >&2 || true
  tail -n 5 "$STATE"/log/*.log >&2 || true
  die "nodes did not become idle within 30 s (logs above)"
fi
echo "local SLURM cluster up ($MODE mode, ${#NODES[@]} nodes, first job id $FIRST_JOB_ID): . $STATE/env.sh"
