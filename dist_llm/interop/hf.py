"""Hugging Face Llama <-> dist-llm: `export-hf`, `import-hf`, and the name and config mapping.

Both sides use the same rotary layout, so weights move across unchanged. Only safetensors are
read or written: pickled `.bin` weights are refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
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
from dist_llm.config import Config, DataConfig, ModelConfig, MoEConfig, RopeScaling
from dist_llm.data.chat import ChatEncoder, read_chat_template, write_chat_template
from dist_llm.errors import CheckpointError, InputError
from dist_llm.files import OutputKind, check_output_dir, holds_only, staged_output, write_json_atomic
from dist_llm.model.roles import (
    EXPERT,
    from_hf_expert_name,
    from_hf_name,
    hf_expert_names,
    hf_name,
    parameter_names,
    role_of,
    tie,
    untie,
)

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# Qwen2-MoE's names of what roles.py names as Mixtral's (its shared expert's names are its own).
_QWEN_MOE = (
    (".block_sparse_moe.gate.", ".mlp.gate."),
    (".w1.weight", ".gate_proj.weight"),
    (".w3.weight", ".up_proj.weight"),
    (".w2.weight", ".down_proj.weight"),
    (".block_sparse_moe.experts.", ".mlp.experts."),
)


def _architecture(config: ModelConfig) -> str:
    """Which transformers class a model exports as: Llama, Mixtral, or Qwen2-MoE (shared expert)."""
    if not config.moe.num_experts:
        return "llama"
    return "qwen2_moe" if config.moe.shared_expert_hidden else "mixtral"


def _to_qwen(name: str) -> str:
    if ".block_sparse_moe." not in name:
        return name
    for mixtral, qwen in _QWEN_MOE:
        name = name.replace(mixtral, qwen)
    return name


def _from_qwen(name: str) -> str:
    if ".mlp.gate." not in name and ".mlp.experts." not in name:
        return name
    for mixtral, qwen in reversed(_QWEN_MOE):
        name = name.replace(qwen, mixtral)
    return name


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
    """The transformers LlamaConfig (MixtralConfig for a mixture of experts) of a model, built
    from the same dict export-hf writes."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    cls = {"llama": LlamaConfig, "mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig}[_architecture(config)]
    return cls.from_dict({**hf_config_dict(config), **extra})


def hf_names(name: str, config: ModelConfig) -> list[str]:
    """The Hugging Face tensors of one of ours: itself renamed, or one per expert of a stack."""
    names = hf_expert_names(name, config.moe.num_experts) if role_of(name).kind == EXPERT else [hf_name(name)]
    return [_to_qwen(n) for n in names] if _architecture(config) == "qwen2_moe" else names


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # A tied lm_head is left out: transformers ties it to embed_tokens itself. Stacked experts
    # become Mixtral's one tensor per expert (the hub's layout, which transformers 4 and 5 read).
    out = {}
    for name, tensor in untie(state, config).items():
        parts = tensor.unbind(0) if role_of(name).kind == EXPERT else [tensor]
        out.update(zip(hf_names(name, config), parts, strict=True))
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # What the model of `config` does not hold (buffers, layers beyond n_layers) is left out.
    ours = set(parameter_names(config))
    named, experts = {}, {}
    for key, tensor in state.items():
        key = _from_qwen(key) if _architecture(config) == "qwen2_moe" else key
        expert = from_hf_expert_name(key)
        if expert is not None:
            experts.setdefault(expert[0], {})[expert[1]] = tensor
        else:
            named[from_hf_name(key)] = tensor
    for name, by_index in experts.items():
        if sorted(by_index) != list(range(config.moe.num_experts)):
            raise CheckpointError(
                f"{name}: experts {sorted(by_index)} found, num_local_experts={config.moe.num_experts} expected"
            )
        named[name] = torch.stack([by_index[j] for j in range(config.moe.num_experts)])
    return tie({k: v for k, v in named.items() if k in ours}, config)


def export_problem(config: ModelConfig) -> str | None:
    """Why a model has no Hugging Face architecture to export to, or None."""
    moe = config.moe
    if not moe.num_experts:
        return None
    if not moe.shared_expert_hidden and (moe.every != 1 or not moe.normalize_top_k):
        return (
            "export-hf writes MixtralForCausalLM (MoE in every layer, renormalised top-k weights: "
            "model.moe.every=1, normalize_top_k=true) or, with a shared expert "
            "(model.moe.shared_expert_hidden > 0), Qwen2MoeForCausalLM"
        )
    return None


# ---------------------------------------------------------------- export


def hf_config_dict(config: ModelConfig, eos_id: int | None = None, bos_id: int | None = None) -> dict:
    """config.json for LlamaForCausalLM (MixtralForCausalLM with experts), readable by
    transformers 4.x and 5.x alike."""
    if config.moe.num_experts:
        return _moe_config_dict(config, eos_id, bos_id)
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
        "bos_token_id": eos_id if bos_id is None else bos_id,
        "eos_token_id": eos_id,
    }


def _moe_config_dict(config: ModelConfig, eos_id: int | None, bos_id: int | None) -> dict:
    llama = hf_config_dict(replace(config, moe=MoEConfig()), eos_id, bos_id)
    base = {k: v for k, v in llama.items() if k not in ("attention_bias", "mlp_bias")}
    moe = config.moe
    if _architecture(config) == "mixtral":
        return base | {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": config.expert_hidden,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "sliding_window": None,
        }
    return base | {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": config.ffn_hidden,  # the dense layers'
        "moe_intermediate_size": config.expert_hidden,
        "shared_expert_intermediate_size": moe.shared_expert_hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "decoder_sparse_step": moe.every,
        "mlp_only_layers": [],
        "norm_topk_prob": moe.normalize_top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "qkv_bias": False,  # read by transformers 5; 4.x's Qwen2-MoE always has q/k/v biases
        "use_sliding_window": False,
        "sliding_window": None,
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
    quantized one (int8, int4) in the compressed-tensors format (`_write_quantized_export`), an
    int8-dynamic one in its W8A8 format (`_write_w8a8_export`)."""
    quantization = read_meta(checkpoint).get("quantization")
    if quantization:
        _check_quantized_export(checkpoint, quantization)
    out = Path(out)
    check_output_dir(out, HF_EXPORT, overwrite)  # before the weights are read
    config = saved_config(checkpoint).model
    problem = export_problem(config)
    if problem:
        raise CheckpointError(f"{checkpoint}: {problem}")
    with staged_output(out, HF_EXPORT, overwrite) as staging:
        if quantization and quantization["method"] == "int8-dynamic":
            _write_w8a8_export(staging, Path(checkpoint), config)
        elif quantization:
            _write_quantized_export(staging, Path(checkpoint), config, quantization)
        else:
            _write_export(staging, Path(checkpoint), config)
    return out


def _check_quantized_export(checkpoint, quantization: dict) -> None:
    if quantization["method"] not in ("int8", "int4", "int8-dynamic"):
        raise CheckpointError(
            f"{checkpoint} is quantized with {quantization['method']}, which export-hf does not "
            "write: export the checkpoint it was quantized from"
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
    bits to an int32), `weight_scale` (per output channel or per group), `weight_shape` and, for
    asymmetric int4, `weight_zero_point` (packed like the codes, along the output dimension);
    embedding, norms and head as in a plain export. transformers (CompressedTensorsHfQuantizer)
    dequantizes them when it loads the folder: (codes - zero) * scale, codes and zero points
    in the signed range [-8, 7], so ours (0..15) go out minus 8."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from dist_llm.checkpoint import load_model
    from dist_llm.model.quantized import QuantLinear

    model, _, _ = load_model(checkpoint)
    bits = 4 if spec["method"] == "int4" else 8
    symmetric = spec.get("symmetric", True)
    tensors, plain = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hf = hf_name(f"{name}.weight").removesuffix(".weight")
            offset = 0 if symmetric else 8  # ours 0..15 around the zero point -> [-8, 7]
            tensors[f"{hf}.weight_packed"] = pack_to_int32(module.codes() - offset, bits)
            tensors[f"{hf}.weight_scale"] = module.scale.float().contiguous()
            tensors[f"{hf}.weight_shape"] = torch.tensor([module.out_features, module.in_features])
            if not symmetric:
                zero = (module.zero.to(torch.int16) - 8).to(torch.int8)
                tensors[f"{hf}.weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0)
        elif not any(True for _ in module.children()):
            plain |= {f"{name}.{k}" if name else k: v for k, v in module.state_dict().items()}
    tensors |= to_hf_state_dict(plain, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False}
    if bits == 4:
        weights |= {"strategy": "group", "group_size": spec["group_size"]}
    else:
        weights |= {"strategy": "channel"}
    quantization = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }
    _write_metadata(folder, checkpoint, config, {"quantization_config": quantization})


def _write_w8a8_export(folder: Path, checkpoint: Path, config: ModelConfig) -> None:
    """compressed-tensors "int-quantized", its W8A8 int8 scheme (vLLM serves it): per linear
    `weight` (our int8 codes) and `weight_scale` [out, 1] (symmetric, per output channel); the
    activations int8, symmetric, per token and dynamic (no stored scale), as our layer computes
    them. Embedding, norms and head as in a plain export."""
    from dist_llm.checkpoint import load_model
    from dist_llm.model.quantized import QuantLinear

    model, _, _ = load_model(checkpoint)
    tensors, plain = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hf = hf_name(f"{name}.weight")
            tensors[hf] = module.codes()
            tensors[hf.removesuffix("weight") + "weight_scale"] = module.scale.float()
        elif not any(True for _ in module.children()):
            plain |= {f"{name}.{k}" if name else k: v for k, v in module.state_dict().items()}
    tensors |= to_hf_state_dict(plain, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    scheme = {
        "targets": ["Linear"],
        "weights": int8 | {"dynamic": False, "strategy": "channel"},
        "input_activations": int8 | {"dynamic": True, "strategy": "token"},
    }
    quantization = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": ["lm_head"],
    }
    _write_metadata(folder, checkpoint, config, {"quantization_config": quantization})


def _write_export(folder: Path, checkpoint: Path, config: ModelConfig) -> None:
    # Streamed, one tensor at a time (checkpoint/stream.py): the same file as save_file of
    # to_hf_state_dict(load_weights(...)), without the model in memory.
    stored = untie(weight_specs(checkpoint), config)  # {our name: (shape, dtype)}
    specs, ours = {}, {}  # by Hugging Face name: (shape, dtype); (our name, expert index or None)
    for name, (shape, dtype) in stored.items():
        if role_of(name).kind == EXPERT:
            for j, hf in enumerate(hf_names(name, config)):
                specs[hf], ours[hf] = (tuple(shape[1:]), dtype), (name, j)
        else:
            (hf,) = hf_names(name, config)
            specs[hf], ours[hf] = (shape, dtype), (name, None)
    names = order(specs)
    # Each stacked expert tensor is read once, where its first expert comes in the file's order.
    reads = list(dict.fromkeys(ours[hf][0] for hf in names))
    tensors = _renamed(iter_weights(checkpoint, reads), names, ours)
    write_safetensors(folder / "model.safetensors", specs, tensors, metadata={"format": "pt"})
    _write_metadata(folder, checkpoint, config)


def _write_metadata(folder: Path, checkpoint: Path, config: ModelConfig, extra: dict | None = None) -> None:
    """config.json (with `extra` keys), the tokenizer files, the chat template and the
    generation config beside an export's weights."""
    bos, eos = _special_ids(checkpoint)
    hf = hf_config_dict(config, eos, bos) | (extra or {})
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copyfile(checkpoint / name, folder / name)
    turn_ends = _export_chat_template(folder)
    if (folder / "generation_config.json").exists():  # an imported model's own
        return
    # generate() stops at any of these: the end of text, and the end of a chat turn (what
    # `dist-llm generate --chat` stops at), as SmolLM2-Instruct's and Llama 3's own files say.
    stops = sorted({eos, *turn_ends} - {None})
    generation = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    write_json_atomic(folder / "generation_config.json", {**generation, "_from_model_config": False})


def _export_chat_template(folder: Path) -> set[int]:
    """The template dist-llm renders chats with (the tokenizer's, else the built-in ChatML), in
    tokenizer_config.json, so that transformers' apply_chat_template gives the same tokens; the
    ids that end an assistant turn under it."""
    if not (folder / "tokenizer.json").exists():
        return set()
    try:
        chat = ChatEncoder(folder)
    except InputError:  # no template, and not the tokens of ChatML: a tokenizer for text only
        return set()
    write_chat_template(folder, chat.template)
    return chat.end_ids


def _renamed(tensors: Iterator[tuple[str, torch.Tensor]], names: list[str], ours: dict):
    """The tensors under `names`, each let go before the next is read (no zip: it would keep
    the previous one while reading the next); a stacked expert weight is held until its last
    expert is written."""
    held: dict[str, torch.Tensor] = {}
    uses: dict[str, int] = {}
    for name in names:
        uses[ours[name][0]] = uses.get(ours[name][0], 0) + 1
    for name in names:
        source, expert = ours[name]
        if source not in held:
            held[source] = next(tensors)[1]
        tensor = held[source] if expert is None else held[source][expert]
        uses[source] -= 1
        if not uses[source]:
            del held[source]
        yield name, tensor
        del tensor


def _special_ids(checkpoint: Path) -> tuple[int | None, int | None]:
    """(bos, eos) ids: the tokenizer config's bos_token and eos_token (an imported model's own),
    else `<|endoftext|>` (what `dist-llm tokenizer train` ends documents with)."""
    path = checkpoint / "tokenizer.json"
    if not path.exists():
        return None, None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        found = tokenizer.token_to_id(token) if token else None
        return tokenizer.token_to_id("<|endoftext|>") if found is None else found

    return token_id("bos_token"), token_id("eos_token")


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
    moe = MoEConfig()
    if hf.get("model_type") == "mixtral":
        if hf.get("sliding_window"):
            raise CheckpointError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    if hf.get("model_type") == "qwen2_moe":
        for key, ok in (("qkv_bias", False), ("use_sliding_window", False), ("mlp_only_layers", [])):
            if hf.get(key, True if key == "qkv_bias" else ok) != ok:
                raise CheckpointError(f"{where}: {key}={hf.get(key, True)!r} is not supported (needs {ok!r})")
        moe = MoEConfig(
            num_experts=hf["num_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_hidden=hf["moe_intermediate_size"],
            shared_expert_hidden=hf["shared_expert_intermediate_size"],
            every=hf.get("decoder_sparse_step", 1),
            normalize_top_k=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
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
        moe=moe,
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
