"""Checks before any process group: low disk space is a warning (a run folder that cannot be
written is a config error in seconds: tests/test_fault_matrix.py)."""

import shutil
from collections import namedtuple

import pytest

from dist_llm.config import load_config
from dist_llm.train import start

from ..launch_util import REPO


def tiny(data, out_dir):
    return load_config(
        REPO / "configs/tiny.yaml", [f"data.sources=[{{path: '{data}'}}]", f"train.out_dir={out_dir}"]
    )


def test_too_little_disk_for_the_kept_checkpoints_is_a_warning(comedy_shards, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.warns(UserWarning, match=r"has 0.0 GB free; 4 checkpoints .* need about"):
        start.preflight(tiny(comedy_shards, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # checks create nothing
