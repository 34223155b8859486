"""The one metrics writer: console line, metrics.jsonl and TensorBoard, all on rank 0 only."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from dist_llm.config import Config, ModelConfig, config_to_dict
from dist_llm.distributed import World
from dist_llm.precision import matmul_flops

# Dense bf16 peaks (TFLOP/s) of common accelerators, from their data sheets (dense, no sparsity).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def flops_per_token(model: ModelConfig, seq_len: int, n_params: int) -> float:
    """PaLM's convention (Chowdhery et al. 2022, appendix B): 6N + 12 * L * H * Q * T.

    N excludes the input embedding table (a lookup, no matmul) but includes the output head,
    which is a matmul even when it shares that table. 12*L*H*Q*T counts attention scores and
    their weighted sum over the full context T, forward and backward, ignoring causal masking.
    """
    n = n_params - (0 if model.tie_embeddings else model.vocab_size * model.dim)
    return 6 * n + 12 * model.n_layers * model.n_heads * model.head_size * seq_len


def peak_flops(config: Config, device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) of one device in the run's dtype: configured, a
    known GPU's 16-bit data sheet, or a matmul measured here (CPUs, fp32 and unknown GPUs)."""
    if config.logging.peak_tflops > 0:
        return config.logging.peak_tflops * 1e12, "logging.peak_tflops"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.dtype, torch.float32)
    where = "this CPU"
    if device.type == "cuda":
        name = where = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name and dtype != torch.float32:
                return tflops * 1e12, f"{name} data sheet, dense {config.train.dtype}"
    n = 4096 if device.type == "cuda" else 1024
    return matmul_flops(dtype, device, n), f"measured {config.train.dtype} {n}^3 matmul on {where}"


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


class Metrics:
    def __init__(self, config: Config, world: World, run_dir: Path):
        self.world, self.config = world, config
        self.enabled = world.is_main
        self.writer = None
        self.jsonl = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (lives as long as the run)
            if config.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}) + "\n")
        self.jsonl.flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def console(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer:
            # TensorBoard renders markdown; indent by four spaces so the sample shows verbatim.
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def embeddings(self, step: int, weight: torch.Tensor, vocab: list[str]) -> None:
        if self.writer:
            labels = [token.replace("\t", "\\t").replace("\n", "\\n") or "<empty>" for token in vocab]
            self.writer.add_embedding(weight, metadata=labels, global_step=step, tag="token_embeddings")

    def hparams(self, results: dict[str, float], extra: dict[str, str] | None = None) -> None:
        """The run's configuration (and `extra` facts such as why a dtype was chosen) beside its results."""
        if self.writer:
            flat = {**_flatten(config_to_dict(self.config)), **(extra or {})}
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
            self.writer.add_hparams(
                hparams, {f"hparam/{k}": v for k, v in results.items()}, run_name="hparams"
            )

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
