"""`export-gguf`: a dist-llm checkpoint -> one GGUF file for llama.cpp, ollama and transformers.

What llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) writes for a Llama: its
tensor names (model/roles.py), the `llama.*` metadata, the byte-level BPE vocabulary as
`tokenizer.ggml.model = "gpt2"`, and q/k weights permuted from the rotate_half layout that we
and Hugging Face use to the interleaved pairs that llama.cpp's rotary kernel reads (transformers'
GGUF loader undoes it). Tensors are written one at a time, quantized by gguf-py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dist_llm.checkpoint import iter_weights, read_meta, saved_config, weight_specs
from dist_llm.config import ModelConfig
from dist_llm.errors import CheckpointError, InputError
from dist_llm.files import OutputKind, check_output_dir, holds_only, staged_output
from dist_llm.model.roles import EMBEDDING_WEIGHT, HEAD_WEIGHT, gguf_name, untie

GGUF_FILE = "model.gguf"
GGUF_EXPORT = OutputKind(
    "a GGUF export",
    f"a folder holding {GGUF_FILE} and nothing else",
    lambda p: holds_only(p, [GGUF_FILE], [GGUF_FILE]),
)
TYPES = ("f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32; other rows stay F16
# gguf-py's token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, UNUSED = 1, 3, 5


def export_gguf(
    checkpoint: str | Path, out: str | Path, outtype: str = "f16", overwrite: bool = False
) -> Path:
    """Any unquantized dist-llm checkpoint -> `out/model.gguf` (F16, Q8_0 or Q4_0)."""
    if outtype not in TYPES:
        raise InputError(f"--outtype {outtype!r}: choose from {', '.join(TYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if read_meta(checkpoint).get("quantization"):
        raise CheckpointError(
            f"{checkpoint} is quantized; export the checkpoint it was quantized from instead"
        )
    config = saved_config(checkpoint).model
    if config.moe.num_experts:
        raise CheckpointError(
            f"{checkpoint} is a mixture-of-experts model, which export-gguf does not write yet; "
            "export-hf writes it as Mixtral, which llama.cpp's convert_hf_to_gguf.py converts"
        )
    vocabulary = read_vocabulary(checkpoint, config.vocab_size)  # before anything is written
    check_output_dir(out, GGUF_EXPORT, overwrite)
    with staged_output(out, GGUF_EXPORT, overwrite) as staging:
        _write(staging / GGUF_FILE, checkpoint, config, vocabulary, outtype)
    return out / GGUF_FILE


def _write(path: Path, checkpoint: Path, config: ModelConfig, vocabulary: dict, outtype: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    _add_model_metadata(writer, config, outtype)
    _add_vocabulary(writer, vocabulary)
    stored = untie(weight_specs(checkpoint), config)  # a tied head is the embedding, written once
    kinds = {name: _tensor_type(name, shape, outtype) for name, (shape, _) in stored.items()}
    for name, (shape, _) in stored.items():  # every tensor's info first: the file's header
        raw = gguf.quant_shape_to_byte_shape(shape, kinds[name])  # what gguf-py expects for bytes
        writer.add_tensor_info(gguf_name(name), raw, np.dtype(np.uint8), int(np.prod(raw)), kinds[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in iter_weights(checkpoint, list(stored)):  # then one tensor at a time
        writer.write_tensor_data(_encode(name, tensor, config, kinds[name]))
        del tensor
    writer.close()


def _tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """Norms F32 (llama.cpp's rule); the matrices as asked, where their rows split into blocks;
    for Q4_0 the embedding and head at Q8_0 (llama.cpp's Q4 files keep them finer, and our int4
    keeps them fp32)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if outtype == "f16" or shape[-1] % QUANT_BLOCK:
        return T.F16
    if outtype == "q4_0" and name not in (EMBEDDING_WEIGHT, HEAD_WEIGHT):
        return T.Q4_0
    return T.Q8_0


def _encode(name: str, tensor: torch.Tensor, config: ModelConfig, kind) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    data = tensor.float()
    if name.endswith("attention.wq.weight"):
        data = permute_rotary(data, config.n_heads)
    elif name.endswith("attention.wk.weight"):
        data = permute_rotary(data, config.n_kv_heads)
    array = data.numpy()
    if kind == T.F32:
        return array.astype(np.float32).view(np.uint8)
    if kind == T.F16:
        return array.astype(np.float16).view(np.uint8)
    return quants.quantize(array, kind)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows of each head from rotate_half order (the first half of the head's channels rotate
    with the second half) to llama.cpp's adjacent pairs: convert_hf_to_gguf.py's `permute`."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _add_model_metadata(writer, config: ModelConfig, outtype: str) -> None:
    from gguf import LlamaFileType

    writer.add_name("dist-llm export")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_size)
    if config.head_size * config.n_heads != config.dim:  # llama.cpp assumes dim / heads otherwise
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[outtype]
    writer.add_file_type(getattr(LlamaFileType, file_type))
    if outtype != "f16":
        writer.add_quantization_version(2)  # GGML_QNT_VERSION, as llama.cpp's converter writes


# ---------------------------------------------------------------- the tokenizer


def read_vocabulary(checkpoint: Path, vocab_size: int) -> dict:
    """tokens, token types, merges and special ids of the checkpoint's byte-level BPE tokenizer
    (data/tokenizer.py), the tokens padded to the model's vocabulary as llama.cpp pads them."""
    path = checkpoint / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{checkpoint} has no tokenizer.json; a GGUF file must carry its vocabulary")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise CheckpointError(
            f"{path}: only byte-level BPE tokenizers (dist-llm tokenizer train) export to GGUF"
        )
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise CheckpointError(
            f"{path}: {len(vocab)} tokens do not fit the model's vocabulary of {vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, CONTROL if token in special else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = special.get("<|endoftext|>")
    return {"tokens": tokens, "types": types, "merges": merges, "eos": eos, "pad": special.get("<|pad|>")}


def _byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    parts = pre_tokenizer.get("pretokenizers") or [pre_tokenizer]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _add_vocabulary(writer, vocabulary: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True) splits with GPT-2's regex
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    writer.add_token_merges(vocabulary["merges"])
    if vocabulary["eos"] is not None:  # our documents end with <|endoftext|>; nothing begins them
        writer.add_bos_token_id(vocabulary["eos"])
        writer.add_eos_token_id(vocabulary["eos"])
    if vocabulary["pad"] is not None:
        writer.add_pad_token_id(vocabulary["pad"])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)


def tensor_names(path: str | Path) -> Iterator[tuple[str, str]]:
    """(name, GGML type) of each tensor in a GGUF file, for checks and tests."""
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        yield tensor.name, tensor.tensor_type.name
