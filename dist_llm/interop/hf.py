"""Hugging Face Llama <-> dist-llm: `export-hf`, `import-hf`, and the name and config mapping.

Both sides use the same rotary layout, so weights move across unchanged. Only safetensors are
read or written: pickled `.bin` weights are refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_llm.checkpoint import (
    TOKENIZER_FILES as CHECKPOINT_TOKENIZER_FILES,
)
from dist_llm.checkpoint import (
    WEIGHTS_ONLY,
    iter_weights,
    read_meta,
    save_weights_only,
    saved_config,
    weight_specs,
)
from dist_llm.checkpoint.stream import order, write_safetensors
from dist_llm.config import Config, DataConfig, ModelConfig, RopeScaling
from dist_llm.data.chat import ChatEncoder, read_chat_template, write_chat_template
from dist_llm.errors import CheckpointError, InputError
from dist_llm.files import OutputKind, check_output_dir, holds_only, staged_output
from dist_llm.model.roles import from_hf_name, hf_name, parameter_names, tie, untie

SUPPORTED = {"LlamaForCausalLM": "llama"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
EXPORT_FILES = ("config.json", "model.safetensors")  # and the tokenizer files, when the checkpoint has them
# What export-hf writes, and so the only folder it replaces (with --overwrite): a Hugging Face
# folder with anything else in it (a README, other weights, a subfolder) is never replaced.
HF_EXPORT = OutputKind(
    "a Hugging Face export",
    f"a folder holding {' and '.join(EXPORT_FILES)} and nothing else but {', '.join(TOKENIZER_FILES)}",
    lambda path: holds_only(path, EXPORT_FILES, EXPORT_FILES + TOKENIZER_FILES),
)


def hf_config(config: ModelConfig, **extra):
    """The transformers LlamaConfig of a model (built from the same dict export-hf writes)."""
    from transformers import LlamaConfig

    return LlamaConfig.from_dict({**hf_config_dict(config), **extra})


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # A tied lm_head is left out: transformers ties it to embed_tokens itself.
    return {hf_name(k): v for k, v in untie(state, config).items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # What the model of `config` does not hold (buffers, layers beyond n_layers) is left out.
    ours = set(parameter_names(config))
    named = {from_hf_name(k): v for k, v in state.items()}
    return tie({k: v for k, v in named.items() if k in ours}, config)


# ---------------------------------------------------------------- export


def hf_config_dict(config: ModelConfig, eos_id: int | None = None) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.x and 5.x alike."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": hf_rope_scaling(config.rope_scaling),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "torch_dtype": "float32",
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


def hf_rope_scaling(r: RopeScaling) -> dict | None:
    """`rope_scaling` of config.json (transformers 5 reads it into `rope_parameters`)."""
    if r.type == "none":
        return None
    out = {"rope_type": r.type, "factor": r.factor}
    if r.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = r.original_max_seq_len
    if r.type == "llama3":
        out |= {"low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor}
    if r.type == "yarn":
        out |= {"beta_fast": r.beta_fast, "beta_slow": r.beta_slow}
    return out


def _rope_scaling_from_hf(hf: dict, path) -> RopeScaling:
    scaling = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    unsupported = {"attention_factor", "mscale", "mscale_all_dim"} & {k for k, v in scaling.items() if v}
    if rope_type not in ("linear", "llama3", "yarn") or unsupported or scaling.get("truncate") is False:
        raise CheckpointError(
            f"{path}: rope scaling {rope_type!r} {sorted(unsupported) or ''} is not supported "
            "(supported: linear, llama3, yarn with its default attention factor)"
        )
    if rope_type in ("llama3", "yarn") and not scaling.get("original_max_position_embeddings"):
        raise CheckpointError(f"{path}: rope scaling {rope_type!r} needs original_max_position_embeddings")
    keys = {
        "factor": "factor",
        "original_max_position_embeddings": "original_max_seq_len",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
    }
    values = {ours: scaling[theirs] for theirs, ours in keys.items() if scaling.get(theirs) is not None}
    return RopeScaling(
        type=rope_type, **{k: float(v) if k != "original_max_seq_len" else int(v) for k, v in values.items()}
    )


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Any dist-llm checkpoint (any ZeRO stage) -> a Hugging Face Llama folder; a weight-only
    quantized one (int8, int4) in the compressed-tensors format (`_write_quantized_export`)."""
    quantization = read_meta(checkpoint).get("quantization")
    if quantization:
        _check_quantized_export(checkpoint, quantization)
    out = Path(out)
    check_output_dir(out, HF_EXPORT, overwrite)  # before the weights are read
    config = saved_config(checkpoint).model
    with staged_output(out, HF_EXPORT, overwrite) as staging:
        if quantization:
            _write_quantized_export(staging, Path(checkpoint), config, quantization)
        else:
            _write_export(staging, Path(checkpoint), config)
    return out


def _check_quantized_export(checkpoint, quantization: dict) -> None:
    if quantization["method"] not in ("int8", "int4"):
        raise CheckpointError(
            f"{checkpoint} is quantized with {quantization['method']}, whose int8 activations no "
            "transformers loader runs on CPU: export-gguf it (Q8_0), quantize the original with "
            "--method int8 for export-hf, or export the checkpoint it was quantized from"
        )
    try:
        import compressed_tensors  # noqa: F401  (transformers' loader for the format)
    except ImportError:
        raise CheckpointError(
            f"{checkpoint} is quantized: export-hf writes it in the compressed-tensors format, "
            "which needs `pip install compressed-tensors` (to write it, and for transformers to "
            "load it); or use export-gguf, or export the checkpoint it was quantized from"
        ) from None


def _write_quantized_export(folder: Path, checkpoint: Path, config: ModelConfig, spec: dict) -> None:
    """compressed-tensors "pack-quantized": per linear `weight_packed` (the integer codes, 32 /
    bits to an int32), `weight_scale` (ours: symmetric, per output channel or per group) and
    `weight_shape`; embedding, norms and head as in a plain export. transformers
    (CompressedTensorsHfQuantizer) dequantizes them when it loads the folder."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from dist_llm.checkpoint import load_model
    from dist_llm.model.quantized import QuantLinear

    model, _, _ = load_model(checkpoint)
    bits = 4 if spec["method"] == "int4" else 8
    tensors, plain = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hf = hf_name(f"{name}.weight").removesuffix(".weight")
            tensors[f"{hf}.weight_packed"] = pack_to_int32(module.codes(), bits)
            tensors[f"{hf}.weight_scale"] = module.scale.float().contiguous()
            tensors[f"{hf}.weight_shape"] = torch.tensor([module.out_features, module.in_features])
        elif not any(True for _ in module.children()):
            plain |= {f"{name}.{k}" if name else k: v for k, v in module.state_dict().items()}
    tensors |= to_hf_state_dict(plain, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False}
    if bits == 4:
        weights |= {"strategy": "group", "group_size": spec["group_size"]}
    else:
        weights |= {"strategy": "channel"}
    hf_config = hf_config_dict(config, _eos_id(checkpoint)) | {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        }
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copyfile(checkpoint / name, folder / name)
    _export_chat_template(folder)


def _write_export(folder: Path, checkpoint: Path, config: ModelConfig) -> None:
    # Streamed, one tensor at a time (checkpoint/stream.py): the same file as save_file of
    # to_hf_state_dict(load_weights(...)), without the model in memory.
    stored = untie(weight_specs(checkpoint), config)  # {our name: (shape, dtype)}
    ours = {hf_name(name): name for name in stored}
    specs = {hf: stored[name] for hf, name in ours.items()}
    names = order(specs)
    tensors = _renamed(iter_weights(checkpoint, [ours[hf] for hf in names]), names)
    write_safetensors(folder / "model.safetensors", specs, tensors, metadata={"format": "pt"})
    eos = _eos_id(checkpoint)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config, eos), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copyfile(checkpoint / name, folder / name)
    _export_chat_template(folder)


def _export_chat_template(folder: Path) -> None:
    """The template dist-llm renders chats with (the tokenizer's, else the built-in ChatML), in
    tokenizer_config.json, so that transformers' apply_chat_template gives the same tokens."""
    if not (folder / "tokenizer.json").exists():
        return
    try:
        template = ChatEncoder(folder).template
    except InputError:  # no template, and not the tokens of ChatML: a tokenizer for text only
        return
    write_chat_template(folder, template)


def _renamed(tensors: Iterator[tuple[str, torch.Tensor]], names: list[str]):
    """The tensors under `names`, each let go before the next is read (no zip: it would keep
    the previous one while reading the next)."""
    for name in names:
        _, tensor = next(tensors)
        yield name, tensor
        del tensor


def _eos_id(checkpoint: Path) -> int | None:
    path = checkpoint / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>")


# ---------------------------------------------------------------- import


def import_hf(model_dir: str | Path, out: str | Path, seq_len: int = 2048, overwrite: bool = False) -> Path:
    """A Hugging Face Llama-family folder (safetensors) -> a weights-only dist-llm checkpoint."""
    model_dir = Path(model_dir)
    hf = _read_hf_config(model_dir)
    model = model_config_from_hf(hf, model_dir / "config.json")
    check_output_dir(Path(out), WEIGHTS_ONLY, overwrite)  # before the weights are read
    weights = from_hf_state_dict(_read_safetensors(model_dir), model)
    missing = sorted(set(parameter_names(model)) - set(weights))
    if missing:
        raise CheckpointError(
            f"{model_dir}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    config = Config(model=model, data=DataConfig(seq_len=min(seq_len, model.max_seq_len)))
    if not (model_dir / "tokenizer.json").exists():
        return save_weights_only(out, weights, config, None, overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _stage_tokenizer(model_dir, Path(tokenizer_dir))
        return save_weights_only(out, weights, config, tokenizer_dir, overwrite=overwrite)


def _stage_tokenizer(model_dir: Path, folder: Path) -> None:
    """The tokenizer files a checkpoint keeps, with the chat template moved into
    tokenizer_config.json from wherever transformers saved it (chat_template.jinja in 5.x)."""
    for name in CHECKPOINT_TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, folder / name)
    template = read_chat_template(model_dir)
    if template is not None:
        write_chat_template(folder, template)


def _read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a folder; point --model at a Hugging Face model folder")
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json; point --model at a Hugging Face model folder")
    hf = json.loads(path.read_text())
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED or hf.get("model_type") != SUPPORTED[arch]:
        raise CheckpointError(
            f"{path}: architecture {arch} (model_type {hf.get('model_type')!r}) is not supported; "
            f"supported: {', '.join(f'{a} (model_type {t!r})' for a, t in SUPPORTED.items())}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported (dist-llm's Llama has no biases)")
    _rope_scaling_from_hf(hf, path)  # refused here when unsupported
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{path}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs silu)"
        )
    return hf


def model_config_from_hf(hf: dict, where) -> ModelConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden=hf["intermediate_size"],
        head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling_from_hf(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found pickled {pickled}: convert them to safetensors first)" if pickled else ""
        raise CheckpointError(f"{model_dir}: no model.safetensors{hint}")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update({k: v.float() for k, v in load_file(str(model_dir / name)).items()})
    return weights
