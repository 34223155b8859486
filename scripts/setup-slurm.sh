#!/usr/bin/env bash
# Install what the local SLURM test cluster needs (slurm/local-cluster, tests/slurm): Debian's
# slurmctld, slurmd, slurm-client and munge. Safe to run again: does nothing when they are there.
# Without root or apt it installs nothing and says so; tests/slurm then skip with that reason
# (under CI=true they fail instead, so CI never passes without running them).
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH=$PATH:/usr/sbin:/sbin
have() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; }
if have >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-slurm.sh: SLURM is not installed and this is not root on a Debian/Ubuntu machine;" \
    "install ${PACKAGES[*]} to run tests/slurm" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "setup-slurm.sh: installing ${PACKAGES[*]} (apt-get)" >&2
if ! apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi
have >/dev/null
