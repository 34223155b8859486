"""The weights every checkpoint holds: writing them (with the tokenizer and dist_llm.json),
weights-only checkpoints, and loading them back, as tensors or as a model ready for eval,
generate and export. Only safetensors are read: nothing is unpickled."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_llm.checkpoint import sharded
from dist_llm.checkpoint.format import (
    FORMAT,
    META,
    SHARDS,
    TOKENIZER_FILES,
    VERSION,
    WEIGHTS,
    check_model_matches,
    is_sharded,
    list_files,
    read_meta,
    saved_config,
)
from dist_llm.config import Config, ModelConfig, config_to_dict
from dist_llm.errors import CheckpointError
from dist_llm.files import OutputKind, staged_output, write_json_atomic
from dist_llm.model.llama import Llama
from dist_llm.model.quantized import finish_loading, prepare_for_loading
from dist_llm.model.roles import tie, tie_module, untie


def write_portable(folder: Path, weights: dict, config: Config, tokenizer_dir, **meta) -> None:
    """A weights-only checkpoint's files: safetensors weights, the tokenizer, dist_llm.json last."""
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(untie(tensors, config.model), str(folder / WEIGHTS))
    write_meta(folder, config, tokenizer_dir, **meta)


def write_meta(folder: Path, config: Config, tokenizer_dir, **meta) -> None:
    """The tokenizer, then dist_llm.json, which lists every file in `folder` (the weights or
    shards are in place by then): the last thing a checkpoint's writer does."""
    for file in TOKENIZER_FILES:
        if tokenizer_dir is not None and (Path(tokenizer_dir) / file).exists():
            shutil.copyfile(Path(tokenizer_dir) / file, folder / file)
    # Listed last, when every rank's files are in place, so that a reader can tell a complete
    # checkpoint from a truncated or partly deleted one (format.verify_files).
    files = list_files(folder)
    write_json_atomic(
        folder / META,
        {"format": FORMAT, "version": VERSION, **meta, "files": files, "config": config_to_dict(config)},
    )


def is_weights_only(path: Path) -> bool:
    """A checkpoint as `save_weights_only` writes it: the only kind its writers replace."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("resumable") is False


WEIGHTS_ONLY = OutputKind(
    "a weights-only dist-llm checkpoint",
    f'a folder whose {META} has "format": "{FORMAT}" and "resumable": false',
    is_weights_only,
)


def save_weights_only(
    path: str | Path,
    weights: dict[str, torch.Tensor],
    config: Config,
    tokenizer_dir=None,
    extra_meta=None,
    overwrite: bool = False,
) -> Path:
    """A checkpoint that holds weights but no optimizer: for init_from, eval, generate, export
    (what import-hf, prune and quantize write). Written beside `path` and swapped in; an existing
    weights-only checkpoint is replaced only with `overwrite`, anything else never."""
    path = Path(path)
    with staged_output(path, WEIGHTS_ONLY, overwrite) as staging:
        write_weights_only(staging, weights, config, tokenizer_dir, extra_meta)
    return path


def write_weights_only(
    folder: Path, weights: dict[str, torch.Tensor], config: Config, tokenizer_dir=None, extra_meta=None
) -> None:
    """The files of a weights-only checkpoint, into an existing (staging) folder."""
    write_portable(
        folder,
        weights,
        config,
        tokenizer_dir,
        step=0,
        tokens=0,
        world_size=0,
        resumable=False,
        **(extra_meta or {}),
    )


def load_weights(path: str | Path, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, assembled from its shards or read from its
    model.safetensors (nothing is unpickled)."""
    path = Path(path)
    saved = saved_config(path)
    if saved.lora.rank:
        raise CheckpointError(
            f"{path} holds LoRA adapters, not a whole model: merge them into the base with "
            f"`dist-llm lora merge --checkpoint {path} --out DIR`, then use DIR"
        )
    check_model_matches(saved.model, model_config, path)
    if is_sharded(path):
        names = [n for n in sharded.specs(path / SHARDS) if n.startswith("model/")]
        full = sharded.read_full(path / SHARDS, names)
        return tie({n.removeprefix("model/"): t for n, t in full.items()}, model_config)
    return tie(load_file(str(path / WEIGHTS)), model_config)


def weight_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{stored name: (shape, dtype)} of a checkpoint's weights, without reading them."""
    path = Path(path)
    if is_sharded(path):
        specs = sharded.specs(path / SHARDS)
        return {n.removeprefix("model/"): s for n, s in specs.items() if n.startswith("model/")}
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), _dtype(f.get_slice(k).get_dtype())) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def weight_bytes(path: str | Path) -> int:
    """What a checkpoint's weights take on disk: its model.safetensors, or (a training
    checkpoint, whose shards also hold the optimizer) the fp32 weights' share of its shards."""
    path = Path(path)
    if not is_sharded(path):
        return (path / WEIGHTS).stat().st_size
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in weight_specs(path).values())


def read_weights(path: str | Path, names) -> dict[str, torch.Tensor]:
    """Some of a checkpoint's weights (stored names), whole: for streaming one at a time."""
    path = Path(path)
    if is_sharded(path):
        full = sharded.read_full(path / SHARDS, [f"model/{n}" for n in names])
        return {n.removeprefix("model/"): t for n, t in full.items()}
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


def iter_weights(path: str | Path, names) -> Iterator[tuple[str, torch.Tensor]]:
    """(stored name, whole tensor) one at a time in the order of `names`, each read only when
    the caller asks for the next: a caller that lets each go first holds one tensor (streaming
    consolidation and export)."""
    path = Path(path)
    if is_sharded(path):
        for name, tensor in sharded.read_each(path / SHARDS, [f"model/{n}" for n in names]):
            yield name.removeprefix("model/"), tensor
            del tensor
        return
    from safetensors import safe_open

    for name in names:
        # safe_open maps the whole file, and every page a tensor is read from stays mapped (and
        # counted in this process's memory) until the file is closed: one opening per tensor.
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            tensor = f.get_tensor(name)
        yield name, tensor
        del tensor


def _dtype(name: str) -> torch.dtype:
    from safetensors.torch import _getdtype

    return _getdtype(name)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, its config, the checkpoint's tokenizer or None) from any checkpoint,
    a quantized one built with the layers its metadata names (model/quantized.py)."""
    from tokenizers import Tokenizer

    config = saved_config(path)
    quantization = read_meta(path).get("quantization")
    if quantization:
        model = Llama(config.model)
        prepare_for_loading(model, quantization)
        model.load_state_dict(load_weights(path, config.model))
        model = finish_loading(model, quantization)
    else:
        # Built without storage and given the loaded tensors: no random draw of weights that are
        # replaced at once (minutes at 7B), no second copy of the model in memory.
        with torch.device("meta"):
            model = Llama(config.model)
        weights = load_weights(path, config.model)  # fp32 as the model's own parameters were
        model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
        tie_module(model, config.model)
        model.reset_buffers()  # the rotary tables, on the weights' device now
    tokenizer_file = Path(path) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None
    if tokenizer is not None:
        tokenizer.encode_special_tokens = True
    return model.to(device).eval(), config, tokenizer
