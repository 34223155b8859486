"""Hugging Face Llama <-> dist-llm: config and parameter names. Both use the same rotary layout,
so weights move across unchanged."""

from __future__ import annotations

import re

import torch

from dist_llm.config import ModelConfig

_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_config(config: ModelConfig, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.dim // config.n_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        **extra,
    )


def hf_name(name: str) -> str:
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if match:
        return f"model.layers.{match[1]}.{_LAYER[match[2]]}.weight"
    return f"{_TOP[name.removesuffix('.weight')]}.weight"


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {hf_name(k): v for k, v in state.items()}
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # HF ties it to embed_tokens itself
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    reverse = {}
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.{i}.{part}.weight" for i in range(config.n_layers) for part in _LAYER
    ]
    for name in names:
        reverse[hf_name(name)] = name
    out = {reverse[k]: v for k, v in state.items() if k in reverse}
    if config.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out
