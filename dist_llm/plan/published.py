"""Published, measured training runs the planner is calibrated against (docs/scaling.md).

Every row is a source's own measurement: model shape, GPUs, sequence length, micro-batch and
gradient accumulation, activation checkpointing, and the throughput per GPU it reports, with the
MFU it derives (PaLM's 6N + 12*L*H*Q*T FLOPs per token, embeddings counted, for all of them).
All are ZeRO-3-style sharding (FSDP FULL_SHARD / FSDP2) in bf16 with fp32 gradient reduction.
tests/plan/test_published.py holds the planner within 15% of every row's MFU.

MPT's GELU MLP (two h x 4h matrices) is entered as a SwiGLU of width 8h/3 (three matrices): the
same parameters and matmul FLOPs; MPT ties its embeddings, has no GQA, ALiBi instead of rotary.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm.config import ModelConfig

TORCHTITAN = "torchtitan docs/performance.md (FSDP2, 64 A100 80GB, torch.compile off)"
LLM_FOUNDRY = "llm-foundry scripts/train/benchmarking/README.md, table 'H100 80GB BF16' (FSDP FULL_SHARD)"


def _llama(dim, layers, heads, kv, ffn, vocab) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_hidden=ffn
    )


def _mpt(dim, layers, heads) -> ModelConfig:
    return ModelConfig(
        vocab_size=50368,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        ffn_hidden=round(8 * dim / 3),
        tie_embeddings=True,
    )


LLAMA3_8B = _llama(4096, 32, 32, 8, 14336, 128256)
LLAMA3_70B = _llama(8192, 80, 64, 8, 28672, 128256)
LLAMA2_13B = _llama(5120, 40, 40, 40, 13824, 32000)
LLAMA2_70B = _llama(8192, 80, 64, 8, 28672, 32000)


@dataclass(frozen=True)
class Run:
    name: str
    source: str
    model: ModelConfig
    gpu: str  # key of dist_llm.plan.speed.GPUS
    gpus: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    recompute: bool  # full activation checkpointing (selective counts as none: it redoes little)
    tokens_per_gpu_s: float
    mfu: float  # as published


RUNS = (
    Run("Llama 3 8B", TORCHTITAN, LLAMA3_8B, "a100", 64, 8192, 1, 1, False, 2904, 0.568),
    Run("Llama 3 70B", TORCHTITAN, LLAMA3_70B, "a100", 64, 8192, 1, 1, True, 331, 0.517),
    Run("Llama 2 13B", TORCHTITAN, LLAMA2_13B, "a100", 64, 4096, 2, 1, False, 2162, 0.611),
    Run("Llama 2 70B", TORCHTITAN, LLAMA2_70B, "a100", 64, 4096, 2, 1, True, 353, 0.505),
    Run("MPT-1B", LLM_FOUNDRY, _mpt(2048, 24, 16), "h100", 8, 2048, 14, 1, False, 45455, 0.4182),
    Run("MPT-1B", LLM_FOUNDRY, _mpt(2048, 24, 16), "h100", 8, 8192, 3, 4, False, 29157, 0.3773),
    Run("MPT-3B", LLM_FOUNDRY, _mpt(2560, 32, 20), "h100", 16, 2048, 10, 3, False, 24142, 0.4373),
    Run("MPT-7B", LLM_FOUNDRY, _mpt(4096, 32, 32), "h100", 8, 2048, 6, 1, False, 10643, 0.4644),
    Run("MPT-7B", LLM_FOUNDRY, _mpt(4096, 32, 32), "h100", 8, 4096, 16, 2, True, 8611, 0.4042),
    Run("MPT-13B", LLM_FOUNDRY, _mpt(5120, 40, 40), "h100", 8, 2048, 2, 1, False, 4792, 0.3979),
    Run("MPT-13B", LLM_FOUNDRY, _mpt(5120, 40, 40), "h100", 64, 2048, 2, 1, False, 4800, 0.3986),
    Run("MPT-30B", LLM_FOUNDRY, _mpt(7168, 48, 64), "h100", 8, 2048, 3, 21, True, 2002, 0.3811),
    Run("MPT-70B", LLM_FOUNDRY, _mpt(8192, 80, 64), "h100", 64, 2048, 8, 4, True, 1039, 0.4257),
)


def predict(run: Run) -> dict:
    """The planner's step for `run`'s layout (ZeRO-3 over all its GPUs, fp32 reduction)."""
    from dist_llm.plan.memory import Layout
    from dist_llm.plan.speed import GPUS, step_time

    layout = Layout(
        dp=run.gpus, zero=3, micro_batch=run.micro_batch, seq_len=run.seq_len, recompute=run.recompute
    )
    return step_time(
        run.model, layout, run.gpus * run.micro_batch * run.grad_accum, GPUS[run.gpu], reduce_bytes=4
    )
