"""Checkpoints built in one process, without training: a sharded training checkpoint as the
Saver writes it (sharded.save + write_meta) and one of the format before sharding as its
writer wrote it, from tensors the test chooses."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_llm.checkpoint import (
    OPTIMIZER,
    SHARDS,
    read_meta,
    saved_config,
    sharded,
    write_meta,
    write_portable,
)
from dist_llm.config import Config, ModelConfig
from dist_llm.model.llama import Llama
from dist_llm.model.roles import untie

MOMENTS = ("exp_avg", "exp_avg_sq")


def tiny_config(tied: bool = False, **model) -> Config:
    """The small model the checkpoint and interop tests save, export and reload: two layers,
    grouped KV heads, a 2048-token vocabulary (the tokenizer_dir fixture's), tied or not;
    `model` overrides fields."""
    shape = dict(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)
    return Config(model=ModelConfig(**{**shape, "tie_embeddings": tied, **model}))


def model_state(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """An initialized model's weights by stored name (a tied head once), moved by seeded noise
    (Llama's own initialization is the same for every seed)."""
    g = torch.Generator().manual_seed(seed)
    state = untie(Llama(config.model).state_dict(), config.model)
    return {k: v.detach() + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def moments_of(weights: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Adam-like moments of every weight, {"exp_avg/<name>": ..., "exp_avg_sq/<name>": ...}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        out[f"exp_avg/{name}"] = torch.randn(w.shape, generator=g) * 1e-3
        out[f"exp_avg_sq/{name}"] = torch.rand(w.shape, generator=g) * 1e-6
    return out


def _meta(step: int) -> dict:
    return {
        "step": step,
        "tokens": step * 1024,
        "world_size": 1,
        "layout": {"tensor": 1, "pipeline": 1, "data": 1},
        "optimizer_steps": step,
        "scheduler": {"last_epoch": step, "_step_count": step + 1},
    }


def _run_state(path: Path, step: int) -> None:
    (path / "rng").mkdir(parents=True)
    torch.save({"torch": torch.get_rng_state(), "python": [step] * 625}, path / "rng" / "rank_00000.pt")
    (path / "data_state.json").write_text(json.dumps([{"position": step * 4}]))


def write_sharded(
    path: Path,
    config: Config,
    tensors: dict[str, torch.Tensor],
    tokenizer_dir=None,
    step: int = 4,
    split: int = 1,
) -> Path:
    """A sharded training checkpoint of `tensors` ({"model/<name>": ..., moments optional}),
    each cut along its first dimension into `split` pieces (as tensor parallelism cuts them)."""
    path.mkdir(parents=True)
    shards = {}
    for name, tensor in tensors.items():
        rows = tensor.shape[0]
        bounds = [rows * i // split for i in range(split + 1)]
        pieces = [
            sharded.Piece((lo, *[0] * (tensor.dim() - 1)), tensor[lo:hi].clone())
            for lo, hi in itertools.pairwise(bounds)
            if hi > lo
        ]
        shards[name] = sharded.Sharded(tuple(tensor.shape), pieces)
    sharded.save(path / SHARDS, shards)
    _run_state(path, step)
    write_meta(path, config, tokenizer_dir, **_meta(step))
    return path


def write_old_format(
    path: Path,
    config: Config,
    weights: dict[str, torch.Tensor],
    moments: dict[str, torch.Tensor] | None,
    tokenizer_dir=None,
    step: int = 4,
) -> Path:
    """A training checkpoint as dist-llm wrote it before sharding: DeepSpeed's files (here
    stand-ins: nothing reads them), rng/, data_state.json, optimizer.safetensors (not under
    ZeRO-0: `moments` None), then model.safetensors, the tokenizer and dist_llm.json."""
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"DeepSpeed's pickled model states" * 100)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"DeepSpeed's optimizer" * 100)
    _run_state(path, step)
    if moments is not None:
        save_file({k: v.contiguous() for k, v in moments.items()}, str(path / OPTIMIZER))
    write_portable(path, weights, config, tokenizer_dir, **_meta(step))
    return path


def old_format_of(new: Path, path: Path) -> Path:
    """A real run's sharded checkpoint as the writer before sharding would have written the same
    state: the full tensors in model.safetensors and optimizer.safetensors, the same metadata
    (no loss scale: that was in DeepSpeed's files), rng/ and data_state.json as they are."""
    config, meta = saved_config(new), read_meta(new)
    full = sharded.read_full(new / SHARDS, sharded.specs(new / SHARDS))
    weights = {k.removeprefix("model/"): v for k, v in full.items() if k.startswith("model/")}
    moments = {k: v for k, v in full.items() if not k.startswith("model/")}
    path.mkdir(parents=True)
    shutil.copytree(new / "rng", path / "rng")
    shutil.copyfile(new / "data_state.json", path / "data_state.json")
    (path / "mp_rank_00_model_states.pt").write_bytes(b"DeepSpeed's pickled model states" * 100)
    save_file(moments, str(path / OPTIMIZER))
    kept = ("step", "tokens", "world_size", "layout", "optimizer_steps", "scheduler")
    write_portable(path, weights, config, new, **{k: meta[k] for k in kept})
    return path
