"""Training-step throughput of dist-llm against HF transformers and the machine's matmul peak.

One process, side by side in one run, same shape (configs/model/small.yaml unless --config),
same batch, same dtype (--dtype; auto = what `train.dtype: auto` picks on this machine):
  * dist-llm: the real training step (DeepSpeed engine, ZeRO-1; in bf16 with fp32 master
    weights; torch AdamW with the kernel optim.implementation picks, fused where torch has one;
    gradient clipping), optionally with torch.compile;
  * the same plain model without DeepSpeed (weights in the dtype, torch AdamW, default kernel);
  * transformers.LlamaForCausalLM with the same weights (weights in the dtype, torch AdamW with
    its default kernel, as a plain transformers loop would have it, SDPA),
    and the same HF model inside the same DeepSpeed step as ours (the like-for-like comparison),
    and HF's model driven by `accelerate` with its DeepSpeedPlugin (ZeRO-1, same DeepSpeed
    settings, torch AdamW): what a user would pick instead of dist-llm;
  * a dense matmul in the dtype, of the same size class, as the achievable peak.
MFU uses PaLM's 6N + 12*L*H*Q*T FLOPs per token.

--repeat N times every step N times in turn (best of N kept, so a burst of load from another
process slows one round, not one variant); --profile adds torch.profiler's top ops by self time
for the dist-llm step, with its forward / backward / optimizer split.

    python benchmarks/bench_train.py [--dtype auto|fp32|bf16] [--steps 8] [--batch 8] [--seq 256]
        [--repeat 2] [--compile] [--profile] [--no-accelerate] [--skip alone,hf-ds]
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


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def profile_step(step, steps: int = 3, top: int = 15) -> str:
    """torch.profiler over `steps` calls of `step` (whose phases are `record_function`-labelled):
    the top ops by self CPU time and the share of each phase."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("phase:")}
    total = sum(phases.values()) or 1.0
    split = ", ".join(f"{k[6:]} {100 * v / total:.0f}%" for k, v in phases.items())
    table = events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return f"phase split of the dist-llm step: {split}\n{table}"


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
    parser.add_argument("--repeat", type=int, default=2, help="rounds over all variants; best kept")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the dist-llm step")
    parser.add_argument("--no-accelerate", action="store_true", help="skip the accelerate variant")
    parser.add_argument(
        "--skip", default="", help="also skip: alone (our model alone), hf-ds (HF in DeepSpeed)"
    )
    args = parser.parse_args()
    skip = set(args.skip.split(","))
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
    steps = {}  # name -> a function running one training step

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
    steps[hf_name] = plain_step(hf, hf_opt, lambda m: lm_loss(m(x).logits, y))

    if "alone" not in skip:
        ours = Llama(cfg.model)
        ours.load_state_dict(reference.state_dict())
        ours.to(device, dtype)
        ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        steps[f"dist-llm model alone, {precision.dtype}"] = plain_step(
            ours, ours_opt, lambda m: lm_loss(m(x), y)
        )

    world = init_world()
    variants = [
        ("transformers in the same DeepSpeed step", "hf"),
        (f"dist-llm training step (DeepSpeed ZeRO-1, {precision.dtype})", "ours"),
    ]
    if args.compile:
        variants.append(("dist-llm training step + torch.compile", "compiled"))
    for name, kind in variants:
        if kind == "hf" and "hf-ds" in skip:
            continue
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
            with torch.profiler.record_function("phase:forward"):
                out = engine(x)
                loss = lm_loss(out.logits if hf_model else out, y)
            with torch.profiler.record_function("phase:backward"):
                engine.backward(loss)
            with torch.profiler.record_function("phase:optimizer"):
                engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        steps[name] = ds_step
        if kind == "ours":
            ours_step = ds_step
    if not args.no_accelerate:
        steps["accelerate + DeepSpeed ZeRO-1 driving transformers"] = accelerate_step(
            cfg, reference, device, precision.dtype, x, y
        )

    compile_started = time.perf_counter()
    for step in steps.values():  # warm-up: first calls allocate, and compile where asked
        for _ in range(2):
            step()
    warmup_s = time.perf_counter() - compile_started
    results = {name: float("inf") for name in steps}
    for round_ in range(args.repeat):
        for name, step in steps.items():
            seconds = timed(step, args.steps)
            results[name] = min(results[name], seconds)
            print(f"  round {round_ + 1}: {name}: {tokens_step / seconds:,.0f} tokens/s", flush=True)

    peak = matmul_flops(dtype, device, 8192 if device.type == "cuda" else 1024)
    print(
        f"model {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
        f"{flops_token / 1e6:.0f} MFLOP/token; {precision.dtype} ({precision.reason}); measured "
        f"{precision.dtype} matmul peak: {format_flops(peak)}"
    )
    base = tokens_step / results[hf_name]
    print(
        f"warm-up of all variants (2 steps each, compilation included): {warmup_s:.1f} s; best of {args.repeat}"
    )
    print(f"\n{'step':<56} {'tokens/s':>10} {'vs HF':>7} {'of peak':>8}")
    for name, seconds in results.items():
        rate = tokens_step / seconds
        of_peak = f"{100 * rate * flops_token / peak:7.1f}%"
        print(f"{name:<56} {rate:>10,.0f} {rate / base:>6.2f}x {of_peak}")
    if args.profile:
        print("\n" + profile_step(ours_step))


def accelerate_step(cfg, reference, device, dtype: str, x, y):
    """HF's model trained the way an `accelerate` user would: Accelerator with a DeepSpeedPlugin
    (ZeRO-1, the same DeepSpeed settings as ours), torch AdamW, clipping by DeepSpeed. On a CPU
    accelerate builds no process group of its own: gloo is named (../shared/notes)."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(cfg.model, attn_implementation="sdpa"))
    model.load_state_dict(to_hf_state_dict(reference.state_dict(), cfg.model), strict=False)
    ds = {
        "train_micro_batch_size_per_gpu": x.shape[0],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
        mixed_precision="bf16" if dtype == "bf16" else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if device.type == "cuda" else "gloo")],
    )
    model, optimizer = accelerator.prepare(model.to(device), torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step():
        loss = lm_loss(model(x).logits, y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


if __name__ == "__main__":
    main()
