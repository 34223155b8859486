"""Every layout error is caught before a process group starts, naming the setting to change."""

import subprocess
import sys

import pytest

from dist_llm.config import ConfigError, load_config
from dist_llm.parallel import data_parallel_size

from ..launch_util import REPO, job_env

SMALL = ["model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "train.dtype=fp32"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel.tensor=3"], "parallel.tensor: 3 must divide model.n_heads=8 and model.n_kv_heads=4"),
        (["parallel.tensor=8"], "parallel.tensor: 8 must divide model.n_heads=8 and model.n_kv_heads=4"),
        (["parallel.pipeline=5"], "parallel.pipeline: 5 stages but only model.n_layers=4"),
        (
            ["parallel.pipeline=2", "parallel.zero_stage=2"],
            "parallel.zero_stage: 2 with parallel.pipeline=2: set 1",
        ),
        (["parallel.pipeline=2", "parallel.zero_stage=3"], "DeepSpeed refuses ZeRO-2/3 with pipelines"),
        # DeepSpeed 0.19.8's fp32 pipeline at ZeRO-0 clips with a wrong global norm
        (["parallel.pipeline=2", "parallel.zero_stage=0"], "wrong gradient-clipping norm"),
        (["parallel.zero_stage=0", "train.dtype=bf16"], "bf16 with ZeRO-0"),
        (
            ["parallel.tensor=4", "parallel.sequence_parallel=true", "data.seq_len=250"],
            "parallel.sequence_parallel: data.seq_len=250 must divide by parallel.tensor=4",
        ),
        (["parallel.context=3"], "parallel.context: 3 must divide the 8 query heads"),
        (
            ["parallel.tensor=2", "parallel.context=8"],
            "parallel.context: 8 must divide the 4 query heads per tensor-parallel rank",
        ),
        (
            ["model.n_heads=12", "model.n_kv_heads=4", "parallel.context=6"],
            "parallel.context: 6 must divide the 12 query heads, and divide or be a multiple of its 4 key/value",
        ),
        (["parallel.context=2", "data.seq_len=255"], "parallel.context: 2 must divide data.seq_len=255"),
        (
            ["parallel.context=2", "parallel.pipeline=2"],
            "context parallelism does not combine with pipelines",
        ),
        (
            ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"],
            "parallel.context: 2 with parallel.sequence_parallel=true is not supported",
        ),
    ],
)
def test_layout_rules(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(None, [*SMALL, *overrides])


def test_fewer_key_value_heads_than_context_ranks_are_copied():
    """4 query and 2 key/value heads per tensor-parallel rank: cp4 gives each rank one query
    head and a copy of its key/value head (test_parity runs it)."""
    config = load_config(None, [*SMALL, "parallel.tensor=2", "parallel.context=4"])
    assert data_parallel_size(config, 8) == 1


def test_world_size_must_be_divisible():
    config = load_config(None, [*SMALL, "parallel.tensor=2", "parallel.pipeline=2"])
    assert data_parallel_size(config, 8) == 2
    with pytest.raises(
        ConfigError, match=r"parallel.tensor=2 x parallel.pipeline=2 = 4 must divide .* \(6\)"
    ):
        data_parallel_size(config, 6)
    context = load_config(None, [*SMALL, "parallel.tensor=2", "parallel.context=2"])
    assert data_parallel_size(context, 8) == 2
    with pytest.raises(ConfigError, match=r"x parallel.context=2 = 4 must divide .* \(6\)"):
        data_parallel_size(context, 6)


def test_train_refuses_a_bad_world_before_starting(comedy_shards, tmp_path):
    """WORLD_SIZE=3 with tp2: refused in preflight, so no rendezvous is ever attempted."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llm",
            "train",
            "--config",
            "configs/tiny.yaml",
            f"data.sources=[{{path: '{comedy_shards}'}}]",
            f"train.out_dir={tmp_path}",
            "parallel.tensor=2",
        ],
        cwd=REPO,
        env=job_env(WORLD_SIZE="3", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: parallel.tensor=2 x parallel.pipeline=1 = 2 must divide the number of processes (3)"
        in proc.stderr
    )


MOE = [*SMALL, "model.moe.num_experts=4"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.moe.top_k=5"], "model.moe.top_k: 5 exceeds model.moe.num_experts=4"),
        (["model.moe.every=5"], "model.moe.every: 5 leaves no MoE layer in model.n_layers=4"),
        (["parallel.expert=3"], "parallel.expert: 3 must divide model.moe.num_experts=4"),
        (["parallel.tensor=2"], "parallel.tensor: 2 with a mixture-of-experts model"),
        (["parallel.pipeline=2"], "parallel.pipeline: 2 with a mixture-of-experts model"),
        (["parallel.context=2"], "parallel.context: 2 with a mixture-of-experts model"),
        (["parallel.zero_stage=3"], "parallel.zero_stage: 3 with a mixture-of-experts model"),
        (["model.moe.capacity_factor=0.0"], "model.moe.capacity_factor"),
    ],
)
def test_mixture_of_experts_rules(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [*MOE, *overrides])


def test_expert_parallelism_needs_experts_and_enough_data_parallel_ranks():
    with pytest.raises(ConfigError, match=r"parallel.expert: 2 needs a mixture-of-experts model"):
        load_config(None, [*SMALL, "parallel.expert=2"])
    config = load_config(None, [*MOE, "parallel.expert=4"])
    assert data_parallel_size(config, 8) == 8
    with pytest.raises(ConfigError, match=r"parallel.expert=4 must divide the 2 data-parallel ranks"):
        data_parallel_size(config, 2)
