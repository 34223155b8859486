"""The checkpoint format's names and metadata: where a run's checkpoints are, which one is
the newest complete one, reading dist_llm.json and checking that a checkpoint holds the model
a config asks for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dist_llm.config import Config, ConfigError, ModelConfig, config_from_dict
from dist_llm.errors import CheckpointError
from dist_llm.model.llama import Llama

FORMAT = "dist-llm-checkpoint"
VERSION = 1
META = "dist_llm.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_root(config: Config) -> Path:
    return Path(config.train.out_dir) / "checkpoints"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / META).exists():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / META).exists() and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.endswith(".tmp"):
        raise CheckpointError(
            f"{path} is an unfinished save (the run died while writing it); use the one before"
        )
    meta_file = path / META
    if not meta_file.exists():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise CheckpointError(
            f"{path} is not a complete dist-llm checkpoint: no {META} (found {found}); "
            "pass a folder like <out_dir>/checkpoints/step_000000100"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_file}: not a dist-llm checkpoint of version {VERSION}")
    return meta


def saved_config(path: str | Path) -> Config:
    try:
        return config_from_dict(read_meta(path)["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path} was written by an incompatible version of dist-llm: {exc}") from None


def saved_layout(meta: dict) -> dict:
    return meta.get("layout") or {"tensor": 1, "pipeline": 1, "data": meta["world_size"]}


def check_model_matches(saved: ModelConfig, wanted: ModelConfig, path) -> None:
    if saved == wanted:
        return
    diffs = [
        f"model.{k}: checkpoint {v!r}, config {getattr(wanted, k)!r}"
        for k, v in dataclasses.asdict(saved).items()
        if v != getattr(wanted, k)
    ]
    shapes = _shape_diffs(saved, wanted)
    if len(shapes) > 10:
        shapes = [*shapes[:10], f"... and {len(shapes) - 10} more parameters"]
    raise CheckpointError(
        f"{path} holds a different model shape:\n  "
        + "\n  ".join(diffs + shapes)
        + "\nset the model section to the checkpoint's (see `dist-llm config show`) or start a new run"
    )


def _shape_diffs(a: ModelConfig, b: ModelConfig) -> list[str]:
    with torch.device("meta"):
        sa = {k: tuple(v.shape) for k, v in Llama(a).state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in Llama(b).state_dict().items()}
    return [
        f"{k}: checkpoint {sa.get(k)}, config {sb.get(k)}"
        for k in sorted(set(sa) | set(sb))
        if sa.get(k) != sb.get(k)
    ]
