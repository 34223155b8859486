"""Checks before any process group: a run folder that cannot be written is a config error in
seconds (not a traceback per rank after DeepSpeed started); low disk space is a warning."""

import shutil
from collections import namedtuple

import pytest
import torch

from dist_llm import cli
from dist_llm.config import ConfigError, load_config
from dist_llm.train import start

from ..launch_util import REPO


def tiny(data, out_dir):
    return load_config(
        REPO / "configs/tiny.yaml", [f"data.sources=[{{path: '{data}'}}]", f"train.out_dir={out_dir}"]
    )


def test_out_dir_under_a_file_fails_before_start_up(comedy_shards, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            f"data.sources=[{{path: '{comedy_shards}'}}]",
            "train.out_dir=/etc/passwd/x",
        ]
    )
    assert code == 2
    assert not torch.distributed.is_initialized()  # refused before any process group
    assert (
        "error: train.out_dir: /etc/passwd/x cannot be created: /etc/passwd is a file"
        in capsys.readouterr().err
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        start.preflight(tiny(comedy_shards, tmp_path / "file"))


def test_too_little_disk_for_the_kept_checkpoints_is_a_warning(comedy_shards, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.warns(UserWarning, match=r"has 0.0 GB free; 4 checkpoints .* need about"):
        start.preflight(tiny(comedy_shards, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # checks create nothing
