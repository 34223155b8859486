"""`dist-llm quantize`: weight quantization of the block linears, stored compactly.

The layers and the methods (int8, int4, int8-dynamic) are the model's, in `model/quantized.py`,
which also builds them when a quantized checkpoint loads; this stage quantizes a checkpoint's
model and writes it with its report.

Weight-only layers save memory and disk; on CPU their decode runs torch's packed int8/int4
kernels (model/quantized.py; docs/compression.md has the measured table), larger batches
dequantize. The embedding and the output head stay in fp32.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dist_llm.checkpoint import WEIGHTS_ONLY, load_model, saved_config
from dist_llm.config import ModelConfig
from dist_llm.errors import InputError
from dist_llm.files import check_output_dir
from dist_llm.model.quantized import QuantLinear, bits_of, swap_block_linears

METHODS = ("int8", "int4", "int8-dynamic")


def quantize_model(model: nn.Module, method: str, group_size: int) -> None:
    """Replace every block linear by its quantized form, in place."""
    bits = bits_of(method)
    swap_block_linears(model, lambda linear: QuantLinear.from_linear(linear, bits, group_size))


def run_quantize(
    checkpoint, out, method: str, group_size: int, evaluation: dict, overwrite: bool = False
) -> dict:
    from dist_llm.compress.report import check_evaluation, save_and_report

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    # Every argument before anything is written: the report's evaluation is only read at the end.
    check_evaluation(evaluation)
    if saved_config(checkpoint).model.moe.num_experts:
        raise InputError(f"{checkpoint} is a mixture-of-experts model, which quantize does not handle yet")
    if method == "int4":
        _check_group_size(saved_config(checkpoint).model, group_size)
    check_output_dir(Path(out), WEIGHTS_ONLY, overwrite)
    model, config, _ = load_model(checkpoint)
    spec = {"method": method, "group_size": group_size if method == "int4" else 0}
    quantize_model(model, method, group_size)
    return save_and_report(
        "quantize",
        checkpoint,
        out,
        model,
        config,
        spec,
        evaluation,
        overwrite=overwrite,
        extra_meta={"quantization": spec},
    )


def _check_group_size(model: ModelConfig, group_size: int) -> None:
    """int4 groups split every block linear's inputs: dim (wq, wk, wv, w1, w3), the heads (wo) and
    ffn_hidden (w2)."""
    widths = {model.dim, model.n_heads * model.head_size, model.ffn_hidden}
    if group_size < 2 or group_size % 2 or any(w % group_size for w in widths):
        raise InputError(
            f"--group-size {group_size} must be even and divide the block linears' input widths "
            f"{sorted(widths)}"
        )
