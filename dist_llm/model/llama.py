"""A plain Llama-style decoder. It knows nothing about parallelism: that is applied from outside.

RMSNorm, rotary embeddings (the `rotate_half` layout that Hugging Face checkpoints use, so
weights move between the two without permutation), SwiGLU (or a mixture of SwiGLU experts, `model/moe.py`), grouped-query attention, causal or
within each packed document (`model/attention.py`), optional tied embeddings, no biases.
Parameter names follow torchtitan (`layers.N.attention.wq`, `feed_forward.w2`, ...); what each
one is (for parallelism, initialization, pruning, Hugging Face) is the table in `model/roles.py`.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config import ModelConfig
from dist_llm.model.attention import Mask, attend, document_mask, document_positions, kernel_for
from dist_llm.model.moe import MoE, SwiGLU
from dist_llm.model.roles import NORM, role_of, tie_module


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the activation dtype: bf16 sums of squares lose too much.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, head_dim] of every position, with `model.rope_scaling` applied."""
    head_dim = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    inv_freq, attention_factor = scaled_frequencies(inv_freq, config.rope_scaling, config.rope_theta)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def scaled_frequencies(inv_freq: torch.Tensor, scaling, theta: float) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) under `scaling` (config.RopeScaling), by the
    formulas transformers' `modeling_rope_utils` uses for the same `rope_type`."""
    factor, original = scaling.factor, scaling.original_max_seq_len
    if scaling.type == "none":
        return inv_freq, 1.0
    if scaling.type == "linear":
        return inv_freq / factor, 1.0
    wavelength = 2 * math.pi / inv_freq
    if scaling.type == "llama3":
        # Wavelengths longer than original / low_freq_factor are stretched, shorter than
        # original / high_freq_factor kept; in between a linear blend of the two.
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    # yarn: dimensions that turn fewer than beta_slow times over the original context are
    # interpolated, more than beta_fast extrapolated, a linear ramp between.
    dim = 2 * inv_freq.numel()

    def dimension_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension_of(scaling.beta_fast)), 0)
    high = min(math.ceil(dimension_of(scaling.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (unchanged frequency)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, 0.1 * math.log(factor) + 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim], or [B, 1, T, head_dim] per row."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of earlier positions, one pair of buffers per layer, for generation."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.n_kv_heads, max_len, config.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    # The kernel over [B, H, T, D] queries, keys and values; context parallelism swaps in one
    # that first trades positions for heads with the other ranks (parallel/context.py).
    kernel = staticmethod(attend)

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_size
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: Mask | None = None,
    ) -> torch.Tensor:
        # Head counts and the sequence length come from the projections' outputs, so a
        # tensor-parallel shard of this module (fewer heads per rank, and with sequence
        # parallelism a shorter input than output) runs the same code.
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        batch, seq = q.shape[:2]
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Causal within the new tokens; with a cache, every new token also sees all cached ones.
        if cache is None or cache.length == 0:
            out = self.kernel(q, k, v, mask)
        else:
            visible = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - seq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(SwiGLU):
    def __init__(self, config: ModelConfig):
        super().__init__(config.dim, config.ffn_hidden)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        # A mixture of experts in the layers model.moe names (model/moe.py), else the dense MLP.
        self.feed_forward = MoE(config) if config.moe.is_moe_layer(layer) else FeedForward(config)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


def attention_inputs(
    config: ModelConfig,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    seq: int,
    document_ids: torch.Tensor | None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, Mask | None]:
    """Rotary tables for positions start..start+seq (or each token's position in its document)
    and the attention mask, shared by every block of one forward. `document_ids` covers whole
    rows, of which the tokens may be a chunk from `start` on (context parallelism): the mask is
    the whole rows' one."""
    if document_ids is None:
        return rope_cos[start : start + seq], rope_sin[start : start + seq], None
    mask = None
    if config.attention == "document":
        mask = document_mask(document_ids, kernel_for(config.attention_kernel, document_ids.device))
    if not config.reset_positions:
        return rope_cos[start : start + seq], rope_sin[start : start + seq], mask
    positions = document_positions(document_ids)[:, start : start + seq]
    return rope_cos[positions].unsqueeze(1), rope_sin[positions].unsqueeze(1), mask


def initial_value(name: str, shape: tuple[int, ...], config: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of parameter `name`, drawn from its own generator.

    Each parameter's value depends only on (seed, name), never on the order of construction,
    so a model built in tensor- or pipeline-parallel pieces starts from exactly the weights a
    single process would: every rank draws the full tensor of the parameters it holds and keeps
    its shard. Normal(0, init_std); projections back into the residual stream are scaled by
    1/sqrt(2 * n_layers) so the residual variance does not grow with depth; norms start at one.
    """
    role = role_of(name)
    if role.kind == NORM:
        return torch.ones(shape)
    std = config.init_std
    if role.residual:
        std /= math.sqrt(2 * config.n_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


class Llama(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        tie_module(self, config)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        if self.tok_embeddings.weight.device.type != "meta":
            self.reset_parameters(seed)

    def reset_buffers(self) -> None:
        cos, sin = rope_tables(self.config)
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        for name, p in self.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), self.config, seed))

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (positions continue after the cache, or
        start at `offset`: the tokens are then a chunk of longer rows); `document_ids` [B, rows'
        length] says which packed document each position of the rows is in."""
        start = cache.length if cache is not None else offset
        if start + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{start + input_ids.shape[1]} positions exceed model.max_seq_len={self.config.max_seq_len}"
            )
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids are for training rows; generation with a cache is one document")
        cos, sin, mask = attention_inputs(
            self.config, self.rope_cos, self.rope_sin, input_ids.shape[1], document_ids, start
        )
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.output(self.norm(h))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100, in fp32 (a batch with
    no such position has mean loss 0, not NaN)."""
    total = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    if reduction == "sum":
        return total
    return total / (labels != -100).sum().clamp(min=1)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    total = sum(p.numel() for p in params.values())
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return total
