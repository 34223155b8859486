"""Training-step throughput of dist-llm against HF transformers and the machine's matmul peak.

One process, side by side in one run, same shape (configs/model/small.yaml unless --config),
same batch, same dtype (--dtype; auto = what `train.dtype: auto` picks on this machine):
  * dist-llm: the real training step (DeepSpeed engine, ZeRO-1; in bf16 with fp32 master
    weights; torch AdamW with the kernel optim.implementation picks, fused where torch has one;
    gradient clipping), optionally with torch.compile;
  * the same plain model without DeepSpeed (weights in the dtype, torch AdamW, default kernel);
  * transformers.LlamaForCausalLM with the same weights (weights in the dtype, torch AdamW with
    its default kernel, as a plain transformers loop would have it, SDPA),
    and the same HF model inside the same DeepSpeed step as ours (the like-for-like comparison);
  * a dense matmul in the dtype, of the same size class, as the achievable peak.
MFU uses PaLM's 6N + 12*L*H*Q*T FLOPs per token.

    python benchmarks/bench_train.py [--dtype auto|fp32|bf16] [--steps 8] [--batch 8] [--seq 256] [--compile]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dist_llm.config import load_config
from dist_llm.distributed import init_world
from dist_llm.interop.hf import hf_config, to_hf_state_dict
from dist_llm.model.llama import Llama, lm_loss, num_params
from dist_llm.precision import format_flops, matmul_flops, resolve_dtype
from dist_llm.train.engine import build_engine
from dist_llm.train.metrics import flops_per_token
from dist_llm.train.start import prepare_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=os.path.join(REPO, "configs/model/small.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time dist-llm with torch.compile")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_dtype(args.dtype, 1, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision.dtype]
    cfg = load_config(
        args.config,
        [
            f"train.dtype={precision.dtype}",
            "parallel.zero_stage=1",
            f"data.seq_len={args.seq}",
            f"train.micro_batch_size={args.batch}",
            "optim.warmup_steps=0",
            "train.steps=100",
        ],
    )
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    torch.manual_seed(0)
    reference = Llama(cfg.model)
    n_params = num_params(reference)
    flops_token = flops_per_token(cfg.model, args.seq, n_params)
    tokens_step = args.batch * args.seq
    results = {}

    def plain_step(model, opt, forward):
        def step():
            loss = forward(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return step

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(cfg.model, attn_implementation="sdpa")).to(device, dtype)
    hf.load_state_dict(to_hf_state_dict(reference.state_dict(), cfg.model), strict=False)
    # What a user of a plain transformers loop writes: torch's AdamW with its default kernel.
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    hf_name = f"transformers LlamaForCausalLM, {precision.dtype}"
    results[hf_name] = timed(plain_step(hf, hf_opt, lambda m: lm_loss(m(x).logits, y)), args.steps)

    ours = Llama(cfg.model)
    ours.load_state_dict(reference.state_dict())
    ours.to(device, dtype)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    results[f"dist-llm model alone, {precision.dtype}"] = timed(
        plain_step(ours, ours_opt, lambda m: lm_loss(m(x), y)), args.steps
    )

    world = init_world()
    variants = [
        ("transformers in the same DeepSpeed step", "hf"),
        (f"dist-llm training step (DeepSpeed ZeRO-1, {precision.dtype})", "ours"),
    ]
    if args.compile:
        variants.append(("dist-llm training step + torch.compile", "compiled"))
    for name, kind in variants:
        if kind == "hf":
            model = LlamaForCausalLM(hf_config(cfg.model, attn_implementation="sdpa"))
            model.load_state_dict(to_hf_state_dict(reference.state_dict(), cfg.model), strict=False)
        else:
            model = Llama(cfg.model)
            model.load_state_dict(reference.state_dict())
        if kind == "compiled":
            prepare_blocks(model, compile=True)
        engine = build_engine(model.to(device), cfg, world)

        def ds_step(engine=engine, hf_model=kind == "hf"):
            out = engine(x)
            loss = lm_loss(out.logits if hf_model else out, y)
            engine.backward(loss)
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        results[name] = timed(ds_step, args.steps, warmup=3 if kind == "compiled" else 2)

    peak = matmul_flops(dtype, device, 4096 if device.type == "cuda" else 1024)
    print(
        f"model {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
        f"{flops_token / 1e6:.0f} MFLOP/token; {precision.dtype} ({precision.reason}); measured "
        f"{precision.dtype} matmul peak: {format_flops(peak)}"
    )
    base = tokens_step / results[hf_name]
    print(f"\n{'step':<52} {'tokens/s':>10} {'vs HF':>7} {'of peak':>8}")
    for name, seconds in results.items():
        rate = tokens_step / seconds
        of_peak = f"{100 * rate * flops_token / peak:7.1f}%"
        print(f"{name:<52} {rate:>10,.0f} {rate / base:>6.2f}x {of_peak}")


if __name__ == "__main__":
    main()
