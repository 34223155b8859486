"""`accelerate launch` starts dist-llm's trainer; its DeepSpeed settings are honoured or refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_llm.accelerate_config import launcher_overrides
from dist_llm.config import ConfigError

from ..launch_util import REPO, free_port, job_env

ZERO2 = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_MIXED_PRECISION": "bf16",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
}


def test_deepspeed_settings_become_overrides_before_the_users():
    got = launcher_overrides(["train.steps=5"], ZERO2)
    assert got == [
        "parallel.zero_stage=2",
        "train.dtype=bf16",
        "train.grad_accum=1",
        "optim.grad_clip=1.0",
        "parallel.offload_optimizer=false",
        "train.steps=5",
    ]
    assert launcher_overrides(["parallel.zero_stage=2", "optim.grad_clip=1"], ZERO2)[-2:] == [
        "parallel.zero_stage=2",
        "optim.grad_clip=1",
    ]  # agreeing values are fine
    assert launcher_overrides(["x.y=1"], {"PATH": "/bin"}) == ["x.y=1"]  # not under accelerate


def test_a_contradiction_or_an_unsupported_setting_is_an_error():
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=3 on the command line.*says 2"):
        launcher_overrides(["parallel.zero_stage=3"], ZERO2)
    cases = {
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": ("ds.json", "writes DeepSpeed's config itself"),
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("cpu", "offload_param_device: none"),
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("nvme", "none or cpu"),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": ("true", "zero3_init_flag: false"),
        "ACCELERATE_MIXED_PRECISION": ("fp8", "no, bf16 or fp16"),
    }
    for variable, (value, fix) in cases.items():
        with pytest.raises(ConfigError, match=f"{variable}={value} is not supported.*{fix}"):
            launcher_overrides([], {**ZERO2, variable: value})
    with pytest.raises(ConfigError, match="ACCELERATE_USE_FSDP=true"):
        launcher_overrides([], {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"})
    # Without DeepSpeed, accelerate only starts processes: its mixed_precision default is not a choice.
    assert launcher_overrides(["a.b=1"], {"ACCELERATE_MIXED_PRECISION": "no", "RANK": "1"}) == ["a.b=1"]


def accelerate(config_file: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "dist_llm", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)


def tiny(data, out, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/tiny.yaml",
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        "train.steps=6",
        "logging.every=1",
        "logging.val_every=0",
        *extra,
    ]


def test_accelerate_launch_trains_with_two_processes_and_its_zero_stage(comedy_shards, tmp_path):
    out = tmp_path / "run"
    proc = accelerate("launch/accelerate/zero2.yaml", *tiny(comedy_shards, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # configs/tiny.yaml says ZeRO-1 fp32; the accelerate config's ZeRO-2 bf16 wins, visibly.
    assert (
        "using the accelerate config's parallel.zero_stage=2 (ACCELERATE_DEEPSPEED_ZERO_STAGE)" in proc.stderr
    )
    assert "world 2 = tp1 x pp1 x dp2 | ZeRO-2 | bf16" in proc.stdout
    meta = json.loads((out / "checkpoints" / "step_000000006" / "dist_llm.json").read_text())
    assert meta["world_size"] == 2
    assert meta["config"]["parallel"]["zero_stage"] == 2 and meta["config"]["train"]["dtype"] == "bf16"


def test_accelerate_launch_refuses_a_contradicting_override(comedy_shards, tmp_path):
    proc = accelerate(
        "launch/accelerate/zero3.yaml", *tiny(comedy_shards, tmp_path / "run", "parallel.zero_stage=1")
    )
    assert proc.returncode != 0
    assert "error: parallel.zero_stage=1 on the command line, but the accelerate config says 3" in proc.stderr
    assert not (tmp_path / "run").exists()
