"""Memory per GPU of a training layout, before any GPU is rented (docs/scaling.md has the terms).

Model states follow the ZeRO paper (Rajbhandari et al. 2020): with mixed-precision Adam a
parameter costs 2 bytes (bf16 weight) + 2 (bf16 gradient) + K = 12 (fp32 master weight, momentum,
variance); fp32 training costs 4 + 4 + 12 under DeepSpeed's ZeRO (it keeps an fp32 master
partition anyway), 4 + 4 + 8 without ZeRO. ZeRO stage 1 partitions the optimizer states over the
data-parallel group, stage 2 the gradients too, stage 3 the parameters too. Tensor and pipeline
parallelism divide the parameters first.

Activations follow Korthikanti et al. 2022 ("Reducing activation recomputation"), per layer and
micro-batch of b sequences of s tokens, hidden size h, a heads, tensor-parallel size t, 16-bit:
    no recomputation:            s*b*h * (10 + 24/t + 5*a*s/(h*t))  bytes
    with sequence parallelism:   s*b*h * (34/t + 5*a*s/(h*t))
    full recomputation:          2*s*b*h   (only each layer's input is kept)
The 5*a*s/h term is the attention score matrix; flash attention (SDPA) never stores it, so it is
dropped when `flash` is true (the default, as in dist-llm's model). The paper's MLP stores 19*s*b*h
bytes (a 4h GELU MLP with dropout); a SwiGLU of width f stores its input (2*s*b*h) and four f-wide
16-bit tensors (8*s*b*f), so the tensor-parallel term becomes 24 + delta with
delta = 2 + 8*f/h - 19 (for Llama 2 7B, f/h = 2.69: delta = 4.5). With 1F1B pipelining the first
stage holds p micro-batches of its L/p layers in flight, i.e. L layers' worth.

Context parallelism (Ulysses, size c) gives each rank s/c of every sequence: every activation
term shrinks by c (the score matrix, a/c heads over the whole sequence, too), as do the logits;
ZeRO partitions over data x context ranks (c * dp of them), which hold replicated weights.

Mixture of experts (model.moe): the experts are most of the parameters but a token runs through
top_k of them, so compute counts the active parameters (`active_parameter_count`) and memory the
total. Expert parallelism (size e, within the data-parallel ranks) keeps 1/e of the experts per
rank, and ZeRO partitions both the experts and, as dist-llm builds it, the dense weights over the
dp / e ranks holding the same experts. An MoE layer's SwiGLU activations are top_k expert-width
(plus the shared expert's) instead of ffn_hidden wide, and each route's input and output rows
(2 * top_k * s*b*h, 16-bit) are kept for the dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm.config import ModelConfig
from dist_llm.model.moe import inactive_params

GB = 1e9


def parameter_count(m: ModelConfig) -> int:
    """Exactly what dist_llm.model.llama.Llama instantiates (tested against it)."""
    hd = m.head_size
    attention = m.dim * hd * (2 * m.n_heads + 2 * m.n_kv_heads)
    mlp = 3 * m.dim * m.ffn_hidden
    per_layer = attention + mlp + 2 * m.dim
    embeddings = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    moe_layers = moe_layer_count(m)
    return m.n_layers * per_layer + embeddings + m.dim + moe_layers * (moe_mlp_count(m) - mlp)


def moe_layer_count(m: ModelConfig) -> int:
    return sum(m.moe.is_moe_layer(i) for i in range(m.n_layers))


def expert_count(m: ModelConfig) -> int:
    """The parameters of every layer's experts (what expert parallelism splits)."""
    return moe_layer_count(m) * m.moe.num_experts * 3 * m.dim * m.expert_hidden


def moe_mlp_count(m: ModelConfig) -> int:
    """One MoE layer's feed-forward: router, experts, shared expert and its gate."""
    shared = (3 * m.dim * m.moe.shared_expert_hidden + m.dim) if m.moe.shared_expert_hidden else 0
    return m.moe.num_experts * (m.dim + 3 * m.dim * m.expert_hidden) + shared


def active_parameter_count(m: ModelConfig) -> int:
    """The parameters one token's forward runs through: top_k of each MoE layer's experts."""
    return parameter_count(m) - inactive_params(m)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    recompute: bool = False  # full activation checkpointing
    sequence_parallel: bool = False
    dtype: str = "bf16"
    cp: int = 1  # context parallelism: each sequence split over cp ranks
    ep: int = 1  # expert parallelism, within the dp ranks

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def model_state_bytes(
    n_params: float, dp: int, zero: int, dtype: str = "bf16", k: int = 12
) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer states for n_params on this GPU's
    model-parallel shard, with ZeRO `zero` over `dp` ranks."""
    param_b, grad_b = (2, 2) if dtype != "fp32" else (4, 4)
    # DeepSpeed's ZeRO optimizers keep an fp32 master partition even when training in fp32, so
    # K = 12 there too; only ZeRO-0 in fp32 is plain Adam (8 bytes of moments).
    opt_b = 8 if (dtype == "fp32" and zero == 0) else k
    params = n_params * param_b / (dp if zero >= 3 else 1)
    grads = n_params * grad_b / (dp if zero >= 2 else 1)
    optim = n_params * opt_b / (dp if zero >= 1 else 1)
    return {"parameters": params, "gradients": grads, "optimizer": optim}


def activation_bytes_per_layer(
    m: ModelConfig, layout: Layout, flash: bool = True, moe: bool = False
) -> float:
    """One layer's activations; `moe`: an MoE layer's (model.moe)."""
    b, h, a, t = layout.micro_batch, m.dim, m.n_heads, layout.tp
    s = layout.seq_len / layout.cp  # this rank's positions
    width = 2 if layout.dtype == "fp32" else 1  # the paper counts 16-bit activations
    if layout.recompute:
        return width * 2 * s * b * h
    if moe:  # top_k experts' SwiGLU per token (and the shared one), and the routes' rows
        k = m.moe.top_k
        f = k * m.expert_hidden + m.moe.shared_expert_hidden
        routes = 2 * 2 * k * s * b * h
        return width * routes + activation_bytes_per_layer(m, layout, flash) - _swiglu(m, f, layout)
    delta = 2 + 8 * m.ffn_hidden / h - 19  # SwiGLU instead of the paper's 4h GELU MLP
    # a/(t*cp) heads' scores over the whole sequence: s * seq_len per head
    scores = 0 if flash else 5 * a * layout.seq_len / (h * t)
    if layout.sequence_parallel:
        return width * s * b * h * ((34 + delta) / t + scores)
    return width * s * b * h * (10 + (24 + delta) / t + scores)


def _swiglu(m: ModelConfig, f: float, layout: Layout) -> float:
    """What a SwiGLU of width f stores beyond one of width ffn_hidden (negative if narrower):
    8 bytes per channel per token (16-bit), over this rank's tokens."""
    width = 2 if layout.dtype == "fp32" else 1
    s = layout.seq_len / layout.cp
    return width * 8 * s * layout.micro_batch * (m.ffn_hidden - f) / layout.tp


def memory_per_gpu(m: ModelConfig, layout: Layout, flash: bool = True) -> dict[str, float]:
    """Bytes on the busiest GPU (the first pipeline stage) by category, and the total."""
    n = parameter_count(m)
    experts = expert_count(m)
    shard = (n - experts) / (layout.tp * layout.pp)
    zero_group = layout.dp * layout.cp // layout.ep
    states = model_state_bytes(shard, zero_group, layout.zero, layout.dtype)
    if experts:  # this rank's experts, partitioned over the ranks holding the same ones
        expert_states = model_state_bytes(experts / layout.ep, zero_group, layout.zero, layout.dtype)
        states = {k: v + expert_states[k] for k, v in states.items()}
        shard += experts / layout.ep
    moe_layers = moe_layer_count(m)
    act = (  # 1F1B: L layers' worth on stage 0
        activation_bytes_per_layer(m, layout, flash) * (m.n_layers - moe_layers)
        + activation_bytes_per_layer(m, layout, flash, moe=True) * moe_layers
    )
    if layout.recompute:  # plus one layer's full activations while it is recomputed
        act += activation_bytes_per_layer(m, Layout(**{**layout.__dict__, "recompute": False}), flash)
    element = 4 if layout.dtype == "fp32" else 2
    # The loss of a micro-batch, split over tensor ranks (vocab-parallel): the logits in the
    # compute dtype, their fp32 copy (bf16 only) and fp32 log-softmax kept for backward, and the
    # fp32 gradient of the logits in backward: 12 bytes per logit in fp32, 14 in bf16.
    logits = (
        (element + 4 * (3 if element == 2 else 2))
        * layout.seq_len
        * layout.micro_batch
        * m.vocab_size
        / (layout.tp * layout.cp)
    )
    # DeepSpeed's reduce and all-gather buckets (default 5e8 elements), never larger than the shard.
    buffers = (2 if layout.zero >= 1 else 1) * element * min(5e8, shard)
    if layout.zero >= 3:  # gathered parameters kept live (stage3_max_live_parameters = 1e9) + prefetch (5e7)
        buffers += element * min(1e9 + 5e7, shard)
    out = {**states, "activations": act, "logits": logits, "buffers": buffers}
    out["total"] = sum(out.values())
    return out


def fit_warning(config, world_size: int, device_bytes: float) -> str | None:
    """The warning `dist-llm train` prints when the planner predicts the run will not fit."""
    p, t = config.parallel, config.train
    layout = Layout(
        tp=p.tensor,
        pp=p.pipeline,
        dp=max(1, world_size // (p.tensor * p.pipeline * p.context)),
        cp=p.context,
        ep=p.expert,
        zero=p.zero_stage,
        micro_batch=t.micro_batch_size,
        seq_len=config.data.seq_len,
        recompute=t.activation_checkpointing,
        sequence_parallel=p.sequence_parallel and p.tensor > 1,
        dtype=t.dtype,
    )
    need = memory_per_gpu(config.model, layout)
    if need["total"] <= device_bytes:
        return None
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in need.items() if k != "total")
    return (
        f"predicted {need['total'] / GB:.1f} GB per GPU ({parts}) exceeds the device's {device_bytes / GB:.1f} GB; "
        "`dist-llm plan --config ... --gpus N` lists layouts that fit"
    )
