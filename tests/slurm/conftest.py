"""A real two-node SLURM cluster for the session (slurm/local-cluster/start.sh), stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ..launch_util import REPO
from .cluster import Cluster, train_args


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [
        tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(tool, path=path)
    ]
    reason = ""
    if missing:
        reason = (
            f"SLURM is not installed ({', '.join(missing)} not found); scripts/test.sh installs "
            "slurmctld slurmd slurm-client munge when run as root on Debian/Ubuntu"
        )
    elif os.geteuid() != 0:
        reason = "the local SLURM cluster needs root (slurmd runs jobs, munged, network namespaces)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        [str(REPO / "slurm" / "local-cluster" / "start.sh"), str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    mode = "netns" if "netns mode" in start.stdout else "loopback"
    gpus = "Gres=gpu" in (state / "etc" / "slurm.conf").read_text()
    try:
        yield Cluster(state, mode, gpus)
    finally:
        subprocess.run([str(REPO / "slurm" / "local-cluster" / "stop.sh"), str(state)], timeout=120)


@pytest.fixture(scope="session")
def data(comedy_shards):
    return comedy_shards


@pytest.fixture(scope="session")
def reference(slurm_cluster, data, tmp_path_factory):
    """The uninterrupted two-node sbatch run every other run is compared with:
    (run folder, log folder, job id, final job record)."""
    root = tmp_path_factory.mktemp("sbatch-ref")
    args = ["--nodes", "2", *slurm_cluster.one_rank_per_node(), "train", *train_args(data, root / "run")]
    job_id = slurm_cluster.submit(root / "logs", *args)
    return root / "run", root / "logs", job_id, slurm_cluster.wait(job_id)
