"""`accelerate launch` as a launcher for dist-llm's own DeepSpeed engine.

    accelerate launch --config_file launch/accelerate/zero2.yaml --num_processes 8 \\
        -m dist_llm train --config configs/quickstart.yaml

accelerate starts the processes (torchrun underneath, so RANK / WORLD_SIZE / MASTER_ADDR are set
as under torchrun and dist_llm/distributed.py needs nothing else). The engine stays dist-llm's:
no `Accelerator` object is built, so neither of accelerate's CPU pitfalls applies (a
DeepSpeedPlugin that needs the transformers package, a process group accelerate does not start
without a GPU).

What accelerate's config says about DeepSpeed is honoured, not ignored: with
`distributed_type: DEEPSPEED` it exports ACCELERATE_* variables, and these become dist-llm
settings (printed by rank 0) as if given on the command line, before the user's own overrides:

    ACCELERATE_DEEPSPEED_ZERO_STAGE                 -> parallel.zero_stage
    ACCELERATE_MIXED_PRECISION (no / bf16 / fp16)   -> train.dtype (fp32 / bf16 / fp16)
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS          -> train.grad_accum
    ACCELERATE_GRADIENT_CLIPPING                    -> optim.grad_clip
    ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE   -> parallel.offload_optimizer (none / cpu)

A command-line override that contradicts one of them is an error naming both. Settings dist-llm
cannot honour are errors too: a DeepSpeed JSON file (deepspeed_config_file), parameter offload,
NVMe offload, zero3_init_flag, fp8, FSDP and Megatron-LM plugins. Without DeepSpeed in its config
(MULTI_GPU / MULTI_CPU), accelerate only starts the processes and the dist-llm config decides
everything; rank 0 says so.

The train and distill stages apply this themselves, so it holds however they were started: it
sits below the stages, not among the launchers in dist_llm/launch/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import yaml

from dist_llm.config import ConfigError

DTYPES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _refuse(variable: str, value: str, fix: str) -> ConfigError:
    return ConfigError(f"accelerate launch: {variable}={value} is not supported by dist-llm; {fix}")


def settings(env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(dist-llm key, value, ACCELERATE_ variable) for what accelerate's config asks of DeepSpeed."""
    for plugin in ("FSDP", "MEGATRON_LM"):
        if env.get(f"ACCELERATE_USE_{plugin}", "").lower() == "true":
            raise _refuse(
                f"ACCELERATE_USE_{plugin}", "true", "use a DEEPSPEED (or MULTI_GPU) accelerate config"
            )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return []
    unsupported = {
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": (
            lambda v: v.lower() not in ("", "none"),
            "dist-llm writes DeepSpeed's config itself: put zero_stage etc. in the accelerate config "
            "or set parallel.*/train.* keys (docs/config.md)",
        ),
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": (
            lambda v: v.lower() not in ("", "none"),
            "set offload_param_device: none (only the optimizer can be offloaded, to cpu)",
        ),
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": (
            lambda v: v.lower() not in ("", "none", "cpu"),
            "set offload_optimizer_device to none or cpu",
        ),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": (
            lambda v: v.lower() == "true",
            "set zero3_init_flag: false (dist-llm builds the model on every rank, then ZeRO-3 partitions it)",
        ),
        "ACCELERATE_MIXED_PRECISION": (lambda v: v.lower() not in DTYPES, "use no, bf16 or fp16"),
    }
    for variable, (bad, fix) in unsupported.items():
        value = env.get(variable, "")
        if bad(value):
            raise _refuse(variable, value, fix)
    found = []
    mapping = [
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "parallel.zero_stage", str),
        ("ACCELERATE_MIXED_PRECISION", "train.dtype", lambda v: DTYPES[v.lower()]),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.grad_accum", str),
        ("ACCELERATE_GRADIENT_CLIPPING", "optim.grad_clip", lambda v: None if v == "none" else str(float(v))),
        (
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            "parallel.offload_optimizer",
            lambda v: "true" if v.lower() == "cpu" else "false",
        ),
    ]
    for variable, key, convert in mapping:
        value = env.get(variable, "")
        converted = convert(value) if value else None
        if converted is not None:
            found.append((key, converted, variable))
    return found


def launcher_overrides(overrides: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """`overrides` with accelerate's DeepSpeed settings in front; unchanged outside accelerate."""
    env = os.environ if env is None else env
    if not any(name.startswith("ACCELERATE_") for name in env):
        return list(overrides)
    found = settings(env)
    mine = {}
    for item in overrides:
        key, _, value = item.partition("=")
        mine[key] = value
    for key, value, variable in found:
        if key in mine and yaml.safe_load(mine[key]) != yaml.safe_load(value):
            raise ConfigError(
                f"{key}={mine[key]} on the command line, but the accelerate config says {value} "
                f"({variable}={env[variable]}); make them agree, or drop one of them"
            )
    if env.get("RANK", "0") == "0":
        if found:
            text = ", ".join(f"{key}={value} ({variable})" for key, value, variable in found)
            print(f"accelerate launch: using the accelerate config's {text}", file=sys.stderr)
        else:
            print(
                "accelerate launch without DeepSpeed in its config: accelerate starts the processes, "
                "the dist-llm config decides ZeRO stage and precision",
                file=sys.stderr,
            )
    return [f"{key}={value}" for key, value, _ in found] + list(overrides)
