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
OPTIMIZER = "optimizer.safetensors"  # in checkpoints from before sharding (dist-llm checkpoint convert)
SHARDS = "shards"  # a training checkpoint's sharded state (checkpoint/sharded.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_root(config: Config) -> Path:
    return Path(config.train.out_dir) / "checkpoints"


def latest(root: Path) -> Path | None:
    """The newest intact checkpoint under `root`, or None when there is none at all; an error
    when there are checkpoints but every one is damaged (never a silent fresh start)."""
    return newest_intact(root)[0]


def newest_intact(root: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint under `root` that reads and verifies, why each newer one was
    skipped). `latest` names the newest normally; a damaged one is passed over, and said so."""
    pointer = root / "latest"
    named = [root / pointer.read_text().strip()] if pointer.exists() else []
    saved = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True
    )
    skipped = []
    for path in dict.fromkeys([*named, *saved]):  # the pointer's first, then newest first
        try:
            read_meta(path)
            return path, skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    if skipped:
        raise CheckpointError(
            f"every checkpoint in {root} is damaged:\n  "
            + "\n  ".join(skipped)
            + "\nrepair or remove them, or set checkpoint.resume=never to start afresh"
        )
    return None, skipped


def is_sharded(path: str | Path) -> bool:
    """A training checkpoint written as per-rank shards (not one model.safetensors)."""
    return (Path(path) / SHARDS).is_dir()


def read_meta(path: str | Path, verify: bool = True) -> dict:
    """dist_llm.json of a complete checkpoint; with `verify`, every file it lists is checked to
    be there at its size (do it where a checkpoint is chosen or opened, not on every read)."""
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
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{meta_file} is damaged (not valid JSON: {exc}); use the checkpoint before it, or remove this one"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_file}: not a dist-llm checkpoint of version {VERSION}")
    if verify:
        verify_files(path, meta)
    return meta


def verify_files(path: Path, meta: dict) -> None:
    """Every file dist_llm.json lists is there at its size (a truncated copy, a deleted weights
    file); checkpoints from before the list at least need their weights."""
    listed = meta.get("files") or {WEIGHTS: None}
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(
                f"{file} is missing (listed in {META}); the checkpoint is damaged: use the one before it"
            )
        if size is not None and file.stat().st_size != size:
            raise CheckpointError(
                f"{file} is truncated or changed: {file.stat().st_size} bytes, {META} says {size}; "
                "the checkpoint is damaged: use the one before it"
            )


def list_files(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file under `folder`, for dist_llm.json (written last)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def saved_config(path: str | Path) -> Config:
    try:
        return config_from_dict(read_meta(path, verify=False)["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path} was written by an incompatible version of dist-llm: {exc}") from None


def saved_layout(meta: dict) -> dict:
    return meta.get("layout") or {"tensor": 1, "pipeline": 1, "data": meta["world_size"]}


# How the model computes, not what: a checkpoint runs with any choice of these.
RUNTIME_ONLY = ("attention_kernel",)
# How the weights see positions and each other, not their shapes: a run may start from weights
# trained with other values (continued pre-training at a longer context, with another mask).
POSITIONAL = ("max_seq_len", "rope_theta", "rope_scaling", "attention", "reset_positions")


def check_model_matches(saved: ModelConfig, wanted: ModelConfig, path, weights_only: bool = False) -> None:
    """`wanted` can run on `path`'s saved state: the same model (`weights_only`: the same
    weights, used at another context length or mask, as checkpoint.init_from may)."""
    same = RUNTIME_ONLY + (POSITIONAL if weights_only else ())
    saved = dataclasses.replace(saved, **{k: getattr(wanted, k) for k in same})
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
