"""Time per step of a layout, and `dist-llm plan`: every valid layout for N GPUs, ranked.

Calibrated against published measured runs (docs/scaling.md, dist_llm/plan/published.py: every
row within 15%). Time per token on one GPU is the sum of what a step does, by mechanism:
  matrix multiplies  6N FLOPs per token (8N with full recomputation: one more forward; the
                     embedding lookup is no matmul) at the GPU's dense-GEMM efficiency, which
                     falls for narrow matrices: gemm_efficiency * w / (w + 512), w = the
                     narrowest GEMM dimension a rank multiplies (min(d, ffn) / tp)
  attention          12*L*H*Q*T FLOPs per token (16 with recomputation) at flash attention's
                     own efficiency, lower than a GEMM's (softmax, masking, smaller tiles)
  elementwise        norms, rotary, SwiGLU, residual adds, casts: (42 d + 9 ffn) 2-byte
                     elements per layer and token forward + backward (a third more with
                     recomputation), and the fp32 loss over the vocabulary, at HBM bandwidth
  optimizer          fused AdamW over this rank's fp32 shard once per step: 36 bytes per
                     parameter (master, moments, gradient read and written, bf16 copy out)
Pipeline bubble: (p - 1) / m of the compute time with m micro-batches per step (1F1B).
Communication, with bytes sent per GPU (ring algorithms send 2 (n-1)/n of the data for an
all-reduce, (n-1)/n for all-gather or reduce-scatter):
  data parallel   ZeRO 0-2: one gradient all-reduce of the shard per step; ZeRO-3: per
                  micro-batch, parameters all-gathered in forward and in backward and gradients
                  reduce-scattered (the gathered copies are freed in between). Across nodes NCCL
                  runs one ring per NIC, so the link is inter-node bandwidth x the group's
                  GPUs per node (at most NVLink's)
  tensor          4 all-reduces of s*b*h activations per layer per micro-batch, within a node
  pipeline        one activation send forward and one gradient back per micro-batch and boundary
  context         Ulysses: 4 all-to-alls per layer forward (q, k, v: k and v at the key/value
                  heads' width; the output) and 4 backward, each sending (c-1)/c of this rank's
                  [b, s/c, width] tensor, within a node while tp * cp fits in one
  expert          per MoE layer 2 all-to-alls forward (routes out, outputs back) and 2 backward,
                  each of top_k * s * b rows of h, (e-1)/e of them to other ranks (balanced
                  routing), within a node while ep fits in one; data-parallel traffic is the
                  dense shard over dp ranks plus this rank's experts over dp / e
A mixture of experts computes with its active parameters (top_k experts per token).
All communication is counted as exposed: published ZeRO-3/FSDP runs lose about their whole
all-gather and reduce-scatter time to it despite prefetching (docs/scaling.md), which is what
separates an A100's ~60% MFU from an H100's ~40-46% besides the H100's harder-to-reach peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dist_llm.config import ModelConfig, context_splits_heads
from dist_llm.plan.memory import (
    GB,
    Layout,
    active_parameter_count,
    expert_count,
    memory_per_gpu,
    moe_layer_count,
    parameter_count,
)


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float  # dense bf16
    memory_gb: float
    intra_gbps: float  # GB/s per GPU within a node (NVLink, one direction)
    inter_gbps: float  # GB/s per GPU between nodes (InfiniBand)
    per_node: int = 8
    memory_tbps: float = 3.35  # HBM bandwidth, TB/s
    # Fractions of the peak a wide bf16 GEMM and flash attention (forward + backward) sustain in
    # training; fitted once per GPU type to the published runs (docs/scaling.md), not per run.
    gemm_efficiency: float = 0.72
    attention_efficiency: float = 0.32


GPUS = {
    # H100 and H200 share the chip; the H200's HBM is larger and faster (measured 790 TFLOP/s for
    # an 8192^3 bf16 GEMM on one, docs/scaling.md: 0.80 of 989 at the widest size).
    "h100": Gpu("H100 SXM", 989.0, 80.0, 450.0, 50.0, memory_tbps=3.35),
    "h200": Gpu("H200 SXM", 989.0, 141.0, 450.0, 50.0, memory_tbps=4.8),
    "a100": Gpu(
        "A100 SXM 80GB",
        312.0,
        80.0,
        300.0,
        25.0,
        memory_tbps=2.0,
        gemm_efficiency=0.86,
        attention_efficiency=0.5,
    ),
}
GEMM_HALF_WIDTH = 512  # a GEMM this narrow runs at half the GPU's wide-GEMM efficiency


def token_seconds(m: ModelConfig, layout: Layout, gpu: Gpu) -> dict[str, float]:
    """Seconds of one token's forward and backward, all of its layers, on one GPU, by part
    (the work of a token divides over tensor, pipeline and context ranks)."""
    n = active_parameter_count(m)  # a mixture of experts multiplies by top_k experts per token
    peak = gpu.peak_tflops * 1e12
    redo = 4 / 3 if layout.recompute else 1.0  # one more forward: 3 passes' work becomes 4
    lookup = 0 if m.tie_embeddings else m.vocab_size * m.dim  # the input embedding is no matmul
    width = min(m.dim, m.ffn_hidden) / layout.tp
    gemm = gpu.gemm_efficiency * width / (width + GEMM_HALF_WIDTH)
    elements = (42 * m.dim + 9 * m.ffn_hidden) * redo * 2 * m.n_layers + 16 * m.vocab_size
    return {
        "matmul": 6 * redo * (n - lookup) / (peak * gemm),
        "attention": 12
        * redo
        * m.n_layers
        * m.n_heads
        * m.head_size
        * layout.seq_len
        / (peak * gpu.attention_efficiency),
        "elementwise": elements / (gpu.memory_tbps * 1e12),
    }


def step_time(m: ModelConfig, layout: Layout, global_batch: int, gpu: Gpu, reduce_bytes: int = 2) -> dict:
    """Seconds of one optimizer step of `global_batch` sequences, by part, and the MFU.
    `reduce_bytes`: bytes per gradient element the data-parallel reduction sends (2: bf16, as
    DeepSpeed's bf16 ZeRO does; 4: fp32, as FSDP's default mixed precision does)."""
    n, active, experts = parameter_count(m), active_parameter_count(m), expert_count(m)
    tokens = global_batch * layout.seq_len
    micro_batches = global_batch // (layout.dp * layout.micro_batch)  # context ranks share them
    parts = token_seconds(m, layout, gpu)
    compute = tokens * sum(parts.values()) / layout.gpus
    bubble = compute * (layout.pp - 1) / micro_batches
    shard = (n - experts) / (layout.tp * layout.pp)  # dense weights; experts below
    reducers = layout.dp * layout.cp  # DeepSpeed reduces (and ZeRO partitions) over data x context
    optimizer = 36 * shard / (reducers if layout.zero >= 1 else 1) / (gpu.memory_tbps * 1e12)
    if layout.gpus > gpu.per_node and layout.dp > 1:  # one ring per NIC, each NIC 1/ring of the data
        ring = min(reducers, max(1, gpu.per_node // layout.tp))
        dp_link = min(gpu.intra_gbps, gpu.inter_gbps * ring)
    else:
        dp_link = gpu.intra_gbps
    if layout.zero >= 3:  # per micro-batch: gather for forward, gather for backward, reduce-scatter
        dp_bytes = micro_batches * shard * (2 + 2 + reduce_bytes)
    else:  # one all-reduce of the gradients per step
        dp_bytes = 2 * shard * reduce_bytes
    dp_comm = dp_bytes * (reducers - 1) / reducers / (dp_link * GB) if reducers > 1 else 0.0
    expert_reducers = layout.dp // layout.ep
    if experts and expert_reducers > 1:  # this rank's experts, reduced over dp / ep ranks
        expert_bytes = (
            (2 * reduce_bytes if layout.zero < 3 else micro_batches * (4 + reduce_bytes))
            * experts
            / layout.ep
        )
        dp_comm += expert_bytes * (expert_reducers - 1) / expert_reducers / (dp_link * GB)
    optimizer += (
        36
        * experts
        / layout.ep
        / max(1, expert_reducers if layout.zero >= 1 else 1)
        / (gpu.memory_tbps * 1e12)
    )
    act = 2 * layout.seq_len / layout.cp * layout.micro_batch * m.dim  # this rank's positions
    layers_here = m.n_layers / layout.pp
    tp_comm = (
        4 * layers_here * micro_batches * 2 * act * (layout.tp - 1) / layout.tp / (gpu.intra_gbps * GB)
        if layout.tp > 1
        else 0.0
    )
    cp_comm = context_bytes_per_layer(m, layout) * layers_here * micro_batches
    cp_link = gpu.inter_gbps if layout.tp * layout.cp > gpu.per_node else gpu.intra_gbps
    cp_comm /= cp_link * GB
    pp_link = gpu.inter_gbps if layout.tp * layout.pp > gpu.per_node else gpu.intra_gbps
    pp_comm = 2 * micro_batches * act / (pp_link * GB) if layout.pp > 1 else 0.0
    ep_link = gpu.inter_gbps if layout.ep > gpu.per_node else gpu.intra_gbps
    ep_comm = expert_bytes_per_layer(m, layout) * moe_layer_count(m) * micro_batches / (ep_link * GB)
    total = compute + bubble + optimizer + dp_comm + tp_comm + pp_comm + cp_comm + ep_comm
    useful = tokens * (6 * active + 12 * m.n_layers * m.n_heads * m.head_size * layout.seq_len)
    return {
        "seconds": total,
        "compute_s": compute,
        **{f"{k}_s": tokens * v / layout.gpus for k, v in parts.items()},
        "bubble_s": bubble,
        "optimizer_s": optimizer,
        "dp_comm_s": dp_comm,
        "tp_comm_s": tp_comm,
        "pp_comm_s": pp_comm,
        "cp_comm_s": cp_comm,
        "ep_comm_s": ep_comm,
        "tokens_per_s": tokens / total,
        "mfu": useful / (total * layout.gpus * gpu.peak_tflops * 1e12),
        "micro_batches": micro_batches,
    }


def context_bytes_per_layer(m: ModelConfig, layout: Layout) -> float:
    """Bytes one rank sends in a layer's Ulysses all-to-alls, forward and backward, per
    micro-batch (16-bit): q and the output at the query heads' width, k and v at the key/value
    heads', each of this rank's s/c positions, (c-1)/c of it to other ranks."""
    if layout.cp == 1:
        return 0.0
    # q, out; k, v (copied up to one head per context rank where there are fewer)
    heads = 2 * m.n_heads / layout.tp + 2 * max(m.n_kv_heads / layout.tp, layout.cp)
    elements = layout.micro_batch * layout.seq_len / layout.cp * heads * m.head_size
    return 2 * 2 * elements * (layout.cp - 1) / layout.cp  # forward + backward, 2 bytes each


def expert_bytes_per_layer(m: ModelConfig, layout: Layout) -> float:
    """Bytes one rank sends in an MoE layer's all-to-alls, forward and backward, per micro-batch
    (16-bit): top_k rows of h per token out and back, (e-1)/e of them to other ranks."""
    if layout.ep == 1 or not m.moe.num_experts:
        return 0.0
    rows = layout.micro_batch * layout.seq_len / layout.cp * m.moe.top_k
    return 2 * 2 * 2 * rows * m.dim * (layout.ep - 1) / layout.ep  # out + back, fwd + bwd, 2 bytes


def _experts(m: ModelConfig, dp: int, zero: int):
    """Expert-parallel sizes dist-llm runs for this data-parallel size (1 for a dense model)."""
    if not m.moe.num_experts:
        return [1]
    if zero == 3:  # dist-llm refuses ZeRO-3 with MoE
        return []
    return [e for e in (1, 2, 4, 8, 16, 32, 64) if not (m.moe.num_experts % e or dp % e)]


def enumerate_layouts(
    m: ModelConfig, gpus: int, global_batch: int, seq_len: int, gpu: Gpu, dtype: str = "bf16"
):
    """Every (tp, pp, dp, ZeRO, micro-batch, expert parallelism, recomputation) that divides
    evenly and that DeepSpeed and dist-llm allow, with its memory and speed; fitting layouts first, fastest first."""
    dtype = "bf16" if dtype == "auto" else dtype  # what `auto` picks on every GPU planned for
    rows = []
    moe = m.moe.num_experts > 0  # dist-llm runs MoE with data and expert parallelism only
    for tp in (1, 2, 4, 8):
        if tp > gpu.per_node or m.n_kv_heads % tp or gpus % tp or (moe and tp > 1):
            continue
        for pp, cp in _pipelines_and_contexts(m, gpus // tp, seq_len, tp, gpu.per_node):
            if moe and (pp > 1 or cp > 1):
                continue
            dp = gpus // (tp * pp * cp)
            for zero in (0, 1, 2, 3):
                if (pp > 1 and zero > 1) or (dtype != "fp32" and zero == 0):
                    continue
                for mb in (1, 2, 4, 8, 16):
                    if global_batch % (dp * mb) or global_batch // (dp * mb) < pp:
                        continue
                    for ep in _experts(m, dp, zero):
                        for recompute in (False, True):
                            layout = Layout(
                                tp=tp,
                                pp=pp,
                                dp=dp,
                                zero=zero,
                                micro_batch=mb,
                                seq_len=seq_len,
                                recompute=recompute,
                                # recommend parallel.sequence_parallel=true (which CP does not combine with)
                                sequence_parallel=tp > 1 and cp == 1,
                                dtype=dtype,
                                cp=cp,
                                ep=ep,
                            )
                            rows.append(_row(m, layout, global_batch, gpu))
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"]))


def _pipelines_and_contexts(m: ModelConfig, ranks: int, seq_len: int, tp: int, per_node: int):
    """(pp, cp) pairs that divide `ranks` (the GPUs per TP group) and that dist-llm runs:
    context parallelism without pipelines, on whole heads, within a node."""
    for pp in range(1, m.n_layers + 1):
        if ranks % pp or m.n_layers % pp:
            continue
        for cp in (1, 2, 4, 8):
            heads_split = not context_splits_heads(m.n_heads // tp, m.n_kv_heads // tp, cp)
            if (ranks // pp) % cp or (
                cp > 1 and (pp > 1 or heads_split or seq_len % cp or tp * cp > per_node)
            ):
                continue
            yield pp, cp


def _row(m: ModelConfig, layout: Layout, global_batch: int, gpu: Gpu) -> dict:
    memory = memory_per_gpu(m, layout)
    return {
        **asdict(layout),
        "memory_gb": memory["total"] / GB,
        "fits": memory["total"] <= 0.9 * gpu.memory_gb * GB,
        **step_time(m, layout, global_batch, gpu),
    }


def format_table(rows: list[dict], limit: int) -> str:
    head = f"{'tp':>3} {'pp':>3} {'cp':>3} {'ep':>3} {'dp':>4} {'zero':>4} {'mb':>3} {'ckpt':>5} {'mem GB':>8} {'fits':>5} {'tok/s':>11} {'MFU':>6} {'bubble':>7}"
    lines = [head]
    for r in rows[:limit]:
        bubble = r["bubble_s"] / r["seconds"]
        lines.append(
            f"{r['tp']:>3} {r['pp']:>3} {r['cp']:>3} {r['ep']:>3} {r['dp']:>4} {r['zero']:>4} {r['micro_batch']:>3} "
            f"{'full' if r['recompute'] else 'no':>5} {r['memory_gb']:>8.1f} {'yes' if r['fits'] else 'NO':>5} "
            f"{r['tokens_per_s']:>11,.0f} {100 * r['mfu']:>5.1f}% {100 * bubble:>6.1f}%"
        )
    return "\n".join(lines)
