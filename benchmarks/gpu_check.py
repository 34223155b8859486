"""The CUDA-only checks of benchmarks/gpu_check.sh (no GPU in CI, so they live here, not in tests/).

  1. fused AdamW on CUDA resumes bitwise: 4 steps straight equal 2 steps, a copy of the model and
     optimizer states to the host and back into fresh objects, and 2 more steps;
  2. the model on CUDA in bf16 against the same weights on the CPU in fp32 (loss within 2%), and
     the CUDA attention kernels (flex with a block mask, SDPA with a dense mask) against each
     other on a packed row of documents;
  3. several processes with NCCL on the one GPU (`--nccl-rank`, started by gpu_check.sh).
Prints one line per check, PASS or FAIL with the figures; exits 1 if any failed.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch

from dist_llm.config import ModelConfig
from dist_llm.model.llama import Llama, lm_loss

CUDA = torch.device("cuda", 0)


def small(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=704, max_seq_len=512)
    return ModelConfig(**{**base, **overrides})


def batches(vocab: int, n: int, seq: int = 256):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, seq + 1), generator=g).to(CUDA) for _ in range(n)]


def train(model, opt, data):
    for row in data:
        loss = lm_loss(model(row[:, :-1]), row[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def fused_adamw_resumes_bitwise() -> tuple[bool, str]:
    cfg, data = small(attention="causal", attention_kernel="sdpa"), batches(512, 4)
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, fused=True)  # noqa: E731
    straight = Llama(cfg, seed=0).to(CUDA)
    opt = make(straight)
    train(straight, opt, data)
    first = Llama(cfg, seed=0).to(CUDA)
    opt1 = make(first)
    train(first, opt1, data[:2])
    model_state = {k: v.cpu() for k, v in first.state_dict().items()}
    opt_state = copy.deepcopy(opt1.state_dict())
    opt_state["state"] = {k: {n: t.cpu() for n, t in s.items()} for k, s in opt_state["state"].items()}
    resumed = Llama(cfg, seed=1).to(CUDA)
    resumed.load_state_dict(model_state)
    opt2 = make(resumed)
    opt2.load_state_dict(opt_state)
    train(resumed, opt2, data[2:])
    diff = max(
        (a - b).abs().max().item() for a, b in zip(straight.parameters(), resumed.parameters(), strict=True)
    )
    return diff == 0.0, f"largest parameter difference after resume {diff:.3g} (want 0)"


def bf16_cuda_matches_fp32_cpu() -> tuple[bool, str]:
    cfg = small(attention="causal")
    row = batches(512, 1)[0]
    cpu = Llama(cfg, seed=0)
    with torch.no_grad():
        want = lm_loss(cpu(row[:, :-1].cpu()), row[:, 1:].cpu()).item()
        got = lm_loss(cpu.to(CUDA, torch.bfloat16)(row[:, :-1]).float(), row[:, 1:]).item()
    return abs(got - want) <= 0.02 * want, f"loss fp32 CPU {want:.5f}, bf16 CUDA {got:.5f}"


def flex_matches_sdpa() -> tuple[bool, str]:
    row = batches(512, 1, seq=512)[0][:, :-1]
    documents = torch.cat([torch.full((4, n), i, device=CUDA) for i, n in enumerate((100, 300, 112))], 1)
    out = {}
    for kernel in ("flex", "sdpa"):
        model = Llama(small(attention="document", attention_kernel=kernel), seed=0).to(CUDA)
        with torch.no_grad():
            out[kernel] = model(row, document_ids=documents)
    diff = (out["flex"] - out["sdpa"]).abs().max().item()
    return diff <= 1e-4, f"largest logit difference flex vs sdpa (fp32, document mask) {diff:.3g}"


def nccl_rank() -> None:
    """One rank of several on cuda:0 (torchrun sets RANK/WORLD_SIZE): an all-reduce and a sum."""
    import torch.distributed as dist

    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", device_id=CUDA)
    x = torch.full((1 << 20,), float(dist.get_rank() + 1), device=CUDA)
    dist.all_reduce(x)
    n = dist.get_world_size()
    ok = x[0].item() == n * (n + 1) / 2
    if dist.get_rank() == 0:
        print(f"{'PASS' if ok else 'FAIL'} nccl: {n} processes on one GPU, all-reduce sum {x[0].item():.0f}")
    dist.destroy_process_group()


def main() -> None:
    if "--nccl-rank" in sys.argv:
        return nccl_rank()
    # Bitwise resume is the optimizer's property only if forward and backward repeat exactly:
    # deterministic cuBLAS workspaces and kernels (warn where an op has no deterministic one).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    failed = 0
    for check in (fused_adamw_resumes_bitwise, bf16_cuda_matches_fp32_cpu, flex_matches_sdpa):
        try:
            ok, detail = check()
        except Exception as e:  # a check that crashes is a failed check; the others still run
            ok, detail = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {check.__name__}: {detail}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
