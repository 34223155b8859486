"""What each parameter of the plain model is, in one table beside it.

Every other place that needs to know about a parameter by its name reads this table: the
tensor-parallel plan (which matrices split by rows, by columns or by vocabulary rows), the
initializer (which projections write back into the residual stream), the Hugging Face and GGUF name
mappings, pruning (attention and MLP inputs and outputs, embeddings, norms), the gathering of full
tensors from shards (which ones carry vocabulary padding), and tied embeddings (the head's weight
*is* the embedding's when `model.tie_embeddings` is set: `tie`, `untie`, `stored_name` and
`tie_module` are the only code that knows it).

The model layer: nothing here may import parallel/, train/, compress/ or interop/.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import nn

from dist_llm.config import ModelConfig

# Kinds. Weights are [out, in] (nn.Linear) or [vocab, dim] (the embedding and the head).
COLUMN = "column"  # an input projection of attention or MLP: its output rows (heads, channels) split
ROW = "row"  # an output projection back to the residual stream: its input columns split
EMBEDDING = "embedding"  # vocabulary-parallel: rows of the padded vocabulary split
HEAD = "head"  # the output head, vocabulary-parallel like the embedding
NORM = "norm"  # an RMSNorm weight: replicated
ROUTER = "router"  # an MoE router [num_experts, dim] (or a shared expert's gate [1, dim]): replicated
EXPERT = "expert"  # stacked expert weights [num_experts, out, in]: expert parallelism splits dim 0

# The dimension tensor parallelism splits; for the block matrices it is also the one holding the
# units (heads, MLP channels) that structured pruning removes.
SPLIT_DIM = {COLUMN: 0, ROW: 1, EMBEDDING: 0, HEAD: 0}

EMBEDDING_WEIGHT = "tok_embeddings.weight"
HEAD_WEIGHT = "output.weight"


class Role(NamedTuple):
    pattern: str  # plain-model parameter name; `*` is the layer index
    kind: str
    residual: bool  # writes into the residual stream: initialized with std / sqrt(2 * n_layers)
    hf: str  # the transformers LlamaForCausalLM name; `{i}` is the layer index
    prune: str  # what pruning treats it as: attention_q, attention_kv, attention_out, mlp_in,
    # mlp_out (the block linears, by the units they hold), embedding or norm
    gguf: str  # llama.cpp's GGUF tensor name (convert_hf_to_gguf.py, gguf-py's tensor_mapping)
    tied_to: str | None = None  # with model.tie_embeddings, this parameter is that one
    # Which layers hold it: every layer, "dense" (feed-forward) ones, "moe" ones, or MoE ones
    # with a shared expert (model.moe); `{j}` in `hf` is then the expert index.
    layers: str = "all"

    @property
    def split_dim(self) -> int | None:
        return SPLIT_DIM.get(self.kind)

    @property
    def hidden_dim(self) -> int:
        """The dimension of size model.dim (the channels embedding pruning removes)."""
        return 0 if self.kind in (ROW, NORM) else 1

    @property
    def vocab(self) -> bool:
        """Whether its rows are the vocabulary (padded to a multiple of the TP size when split)."""
        return self.kind in (EMBEDDING, HEAD)


_L = "model.layers.{i}."
_B = "blk.{i}."
ROLES = (
    Role(EMBEDDING_WEIGHT, EMBEDDING, False, "model.embed_tokens.weight", "embedding", "token_embd.weight"),
    Role(
        "layers.*.attention_norm.weight",
        NORM,
        False,
        _L + "input_layernorm.weight",
        "norm",
        _B + "attn_norm.weight",
    ),
    Role(
        "layers.*.attention.wq.weight",
        COLUMN,
        False,
        _L + "self_attn.q_proj.weight",
        "attention_q",
        _B + "attn_q.weight",
    ),
    Role(
        "layers.*.attention.wk.weight",
        COLUMN,
        False,
        _L + "self_attn.k_proj.weight",
        "attention_kv",
        _B + "attn_k.weight",
    ),
    Role(
        "layers.*.attention.wv.weight",
        COLUMN,
        False,
        _L + "self_attn.v_proj.weight",
        "attention_kv",
        _B + "attn_v.weight",
    ),
    Role(
        "layers.*.attention.wo.weight",
        ROW,
        True,
        _L + "self_attn.o_proj.weight",
        "attention_out",
        _B + "attn_output.weight",
    ),
    Role(
        "layers.*.ffn_norm.weight",
        NORM,
        False,
        _L + "post_attention_layernorm.weight",
        "norm",
        _B + "ffn_norm.weight",
    ),
    Role(
        "layers.*.feed_forward.w1.weight",
        COLUMN,
        False,
        _L + "mlp.gate_proj.weight",
        "mlp_in",
        _B + "ffn_gate.weight",
        layers="dense",
    ),
    Role(
        "layers.*.feed_forward.w3.weight",
        COLUMN,
        False,
        _L + "mlp.up_proj.weight",
        "mlp_in",
        _B + "ffn_up.weight",
        layers="dense",
    ),
    Role(
        "layers.*.feed_forward.w2.weight",
        ROW,
        True,
        _L + "mlp.down_proj.weight",
        "mlp_out",
        _B + "ffn_down.weight",
        layers="dense",
    ),
    # Mixture-of-experts layers (model/moe.py). Hugging Face: Mixtral's hub names (transformers
    # 5 merges the experts into 3-D tensors as it loads them); GGUF: llama.cpp's stacked experts.
    Role(
        "layers.*.feed_forward.router.weight",
        ROUTER,
        False,
        _L + "block_sparse_moe.gate.weight",
        "router",
        _B + "ffn_gate_inp.weight",
        layers="moe",
    ),
    Role(
        "layers.*.feed_forward.experts.w1",
        EXPERT,
        False,
        _L + "block_sparse_moe.experts.{j}.w1.weight",
        "expert",
        _B + "ffn_gate_exps.weight",
        layers="moe",
    ),
    Role(
        "layers.*.feed_forward.experts.w3",
        EXPERT,
        False,
        _L + "block_sparse_moe.experts.{j}.w3.weight",
        "expert",
        _B + "ffn_up_exps.weight",
        layers="moe",
    ),
    Role(
        "layers.*.feed_forward.experts.w2",
        EXPERT,
        True,
        _L + "block_sparse_moe.experts.{j}.w2.weight",
        "expert",
        _B + "ffn_down_exps.weight",
        layers="moe",
    ),
    # Qwen2-MoE's shared expert and its gate.
    Role(
        "layers.*.feed_forward.shared.w1.weight",
        COLUMN,
        False,
        _L + "mlp.shared_expert.gate_proj.weight",
        "expert",
        _B + "ffn_gate_shexp.weight",
        layers="shared",
    ),
    Role(
        "layers.*.feed_forward.shared.w3.weight",
        COLUMN,
        False,
        _L + "mlp.shared_expert.up_proj.weight",
        "expert",
        _B + "ffn_up_shexp.weight",
        layers="shared",
    ),
    Role(
        "layers.*.feed_forward.shared.w2.weight",
        ROW,
        True,
        _L + "mlp.shared_expert.down_proj.weight",
        "expert",
        _B + "ffn_down_shexp.weight",
        layers="shared",
    ),
    Role(
        "layers.*.feed_forward.shared_gate.weight",
        ROUTER,
        False,
        _L + "mlp.shared_expert_gate.weight",
        "router",
        _B + "ffn_gate_inp_shexp.weight",
        layers="shared",
    ),
    Role("norm.weight", NORM, False, "model.norm.weight", "norm", "output_norm.weight"),
    Role(HEAD_WEIGHT, HEAD, False, "lm_head.weight", "embedding", "output.weight", tied_to=EMBEDDING_WEIGHT),
)

# The linear layers inside a dense block, as module paths below `layers.N` ("attention.wq", ...).
BLOCK_LINEARS = tuple(
    r.pattern.removeprefix("layers.*.").removesuffix(".weight")
    for r in ROLES
    if r.kind in (COLUMN, ROW) and r.layers in ("all", "dense")
)


def _regex(template: str, wildcard: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split(wildcard)))


_OURS = [(_regex(r.pattern, "*"), r) for r in ROLES]
_THEIRS = [(_regex(r.hf, "{i}"), r) for r in ROLES if "{j}" not in r.hf]
# Per-expert Hugging Face names: (layer, expert) groups.
_THEIR_EXPERTS = [
    (re.compile(r"(\d+)".join(re.escape(part) for part in re.split(r"\{i\}|\{j\}", r.hf))), r)
    for r in ROLES
    if "{j}" in r.hf
]
_TIES = {r.pattern: r.tied_to for r in ROLES if r.tied_to}


def _match(name: str, table) -> tuple[Role, str | None] | None:
    for regex, role in table:
        found = regex.fullmatch(name)
        if found:
            return role, (found.group(1) if found.groups() else None)
    return None


def role_of(name: str) -> Role:
    """The row of a plain-model parameter name ("layers.3.attention.wq.weight")."""
    found = _match(name, _OURS)
    if found is None:
        raise KeyError(f"{name!r} is not a parameter of the plain model (dist_llm/model/roles.py)")
    return found[0]


def holds(role: Role, config: ModelConfig, layer: int) -> bool:
    """Whether layer `layer` of the model of `config` has a parameter of `role`."""
    moe = config.moe.is_moe_layer(layer)
    return {
        "all": True,
        "dense": not moe,
        "moe": moe,
        "shared": moe and config.moe.shared_expert_hidden > 0,
    }[role.layers]


def parameter_names(config: ModelConfig) -> list[str]:
    """Every parameter name of the plain model of `config`, the tied head included."""
    top = [r.pattern for r in ROLES if "*" not in r.pattern]
    blocks = [r for r in ROLES if "*" in r.pattern]
    return top + [
        r.pattern.replace("*", str(i)) for i in range(config.n_layers) for r in blocks if holds(r, config, i)
    ]


# ---------------------------------------------------------------- Hugging Face names


def hf_name(name: str) -> str:
    """Our name -> transformers' LlamaForCausalLM (MixtralForCausalLM) name; stacked experts
    keep `{j}`, where the expert index goes (`hf_expert_names`)."""
    found = _match(name, _OURS)
    if found is None:
        raise KeyError(f"{name!r} has no Hugging Face name")
    role, layer = found
    return role.hf if layer is None else role.hf.replace("{i}", layer)


def hf_expert_names(name: str, num_experts: int) -> list[str]:
    """The Hugging Face names of the experts of one stacked expert weight, in expert order."""
    return [hf_name(name).replace("{j}", str(j)) for j in range(num_experts)]


def gguf_name(name: str) -> str:
    """Our name -> llama.cpp's GGUF tensor name ("blk.3.attn_q.weight")."""
    found = _match(name, _OURS)
    if found is None:
        raise KeyError(f"{name!r} has no GGUF name")
    role, layer = found
    return role.gguf.format(i=layer)


def from_hf_expert_name(hf: str) -> tuple[str, int] | None:
    """A per-expert Hugging Face name -> (our stacked weight's name, expert index); None for others."""
    for regex, role in _THEIR_EXPERTS:
        found = regex.fullmatch(hf)
        if found:
            return role.pattern.replace("*", found.group(1)), int(found.group(2))
    return None


def from_hf_name(hf: str) -> str | None:
    """transformers' name -> ours; None for what the table does not map (buffers that some
    transformers versions save, such as rotary_emb.inv_freq, and per-expert weights:
    `from_hf_expert_name`)."""
    found = _match(hf, _THEIRS)
    if found is None:
        return None
    role, layer = found
    return role.pattern.replace("*", layer) if layer is not None else role.pattern


# ---------------------------------------------------------------- tied embeddings


def stored_name(name: str, config: ModelConfig) -> str:
    """The name a parameter's tensor is stored (and initialized) under: a tied head is the
    embedding."""
    return _TIES.get(name, name) if config.tie_embeddings else name


def untie(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under its stored name (safetensors refuses
    shared storage; Hugging Face re-ties lm_head itself). `tie` is the inverse."""
    if not config.tie_embeddings:
        return dict(state)
    return {k: v for k, v in state.items() if k not in _TIES}


def tie(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A stored state dict with the tied names back, sharing their tensor (what
    `load_state_dict` expects)."""
    if not config.tie_embeddings:
        return dict(state)
    return {**state, **{name: state[to] for name, to in _TIES.items()}}


def tie_module(module: nn.Module, config: ModelConfig) -> None:
    """Make the head's weight the embedding's, in a module holding both (the whole model, or a
    tensor-parallel copy of it after its layers were swapped)."""
    if config.tie_embeddings and hasattr(module, "output") and hasattr(module, "tok_embeddings"):
        module.output.weight = module.tok_embeddings.weight


# ---------------------------------------------------------------- vocabulary padding


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of the tensor-parallel size."""
    return math.ceil(vocab_size / tp_size) * tp_size


def pad_vocab(weight: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended along `dim` up to `rows` (unchanged if it has that many):
    split evenly over the ranks, the padding rows sit on the last one."""
    if weight.shape[dim] >= rows:
        return weight
    pad = list(weight.shape)
    pad[dim] = rows - weight.shape[dim]
    return torch.cat([weight, weight.new_zeros(pad)], dim=dim)
