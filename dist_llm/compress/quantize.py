"""`dist-llm quantize`: weight quantization of the block linears, stored compactly.

The layers and the methods (int8, int4, int8-dynamic) are the model's, in `model/quantized.py`,
which also builds them when a quantized checkpoint loads; this stage quantizes a checkpoint's
model and writes it with its report.

Weight-only layers save memory and disk; on CPU their decode runs torch's packed int8/int4
kernels (model/quantized.py; docs/compression.md has the measured table), larger batches
dequantize. int8-dynamic (W8A8) stores the same int8 weights and quantizes the activations per
token as it runs (int8 GEMMs, `torch._int_mm`). The embedding and the output head stay in fp32.
int4 groups are symmetric (codes -8..7) or, with `--asymmetric`, on each group's min/max range
with an integer zero point (codes 0..15); `--mse-clip` shrinks each group's range to the one
with the least |w - Q(w)|^2.4.

Calibrated variants (they read `--data`/`--text` like `prune`): `--algorithm gptq`
(`compress/gptq.py`: error-compensating int4/int8, the same stored format) and, for
int8-dynamic, `--smoothquant ALPHA` (`compress/smooth.py`: activation outliers folded into the
weights before quantizing).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dist_llm.checkpoint import WEIGHTS_ONLY, load_model, saved_config
from dist_llm.config import ModelConfig
from dist_llm.errors import InputError
from dist_llm.files import check_output_dir
from dist_llm.model.quantized import DynamicInt8Linear, QuantLinear, bits_of, swap_block_linears

METHODS = ("int8", "int4", "int8-dynamic")
ALGORITHMS = ("rtn", "gptq")  # round-to-nearest, or GPTQ's error compensation on calibration data


def quantize_model(
    model: nn.Module, method: str, group_size: int, *, symmetric: bool = True, mse: bool = False
) -> None:
    """Replace every block linear by its quantized form, in place (int4: `symmetric` or with zero
    points, `mse`: clipped ranges)."""
    if method == "int8-dynamic":
        swap_block_linears(model, DynamicInt8Linear.from_linear)
        return
    bits = bits_of(method)
    swap_block_linears(
        model, lambda linear: QuantLinear.from_linear(linear, bits, group_size, symmetric, mse)
    )


def run_quantize(
    checkpoint,
    out,
    method: str,
    group_size: int,
    evaluation: dict,
    overwrite: bool = False,
    *,
    algorithm: str = "rtn",
    calibration: dict | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    smoothquant: float = 0.0,
    asymmetric: bool = False,
    mse_clip: bool = False,
) -> dict:
    from dist_llm.compress.calibrate import calibration_batches, check_calibration
    from dist_llm.compress.report import check_evaluation, save_and_report

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    # Every argument before anything is written: the report's evaluation is only read at the end.
    _check_options(method, algorithm, damp, act_order, smoothquant, asymmetric, mse_clip)
    calibrated = algorithm == "gptq" or smoothquant > 0
    if calibrated:
        if calibration is None:
            raise InputError(f"--algorithm {algorithm} / --smoothquant need calibration data")
        check_calibration(calibration)
    check_evaluation(evaluation)
    if saved_config(checkpoint).model.moe.num_experts:
        raise InputError(f"{checkpoint} is a mixture-of-experts model, which quantize does not handle yet")
    if method == "int4":
        _check_group_size(saved_config(checkpoint).model, group_size)
    check_output_dir(Path(out), WEIGHTS_ONLY, overwrite)
    model, config, tokenizer = load_model(checkpoint)
    spec = {"method": method, "group_size": group_size if method == "int4" else 0, "algorithm": algorithm}
    if method == "int4":  # absent (older checkpoints) = symmetric
        spec |= {"symmetric": not asymmetric, "mse_clip": mse_clip}
    settings = dict(spec)
    if calibrated:
        batches = calibration_batches(tokenizer, **calibration)
        settings["calibration"] = calibration
        settings["calibration_tokens"] = sum(b.numel() for b in batches)
    if smoothquant > 0:
        from dist_llm.compress.smooth import activation_maxima, smooth_model

        smooth_model(model, activation_maxima(model, batches), smoothquant)
        spec["smoothquant"] = settings["smoothquant"] = smoothquant
    if algorithm == "gptq":
        from dist_llm.compress.gptq import gptq_model

        gptq_model(
            model,
            batches,
            bits_of(method),
            spec["group_size"],
            damp,
            act_order,
            symmetric=not asymmetric,
            mse=mse_clip,
        )
        settings |= {"damp": damp, "act_order": act_order}
    else:
        quantize_model(model, method, group_size, symmetric=not asymmetric, mse=mse_clip)
    return save_and_report(
        "quantize",
        checkpoint,
        out,
        model,
        config,
        settings,
        evaluation,
        overwrite=overwrite,
        extra_meta={"quantization": spec},
    )


def _check_options(
    method: str,
    algorithm: str,
    damp: float,
    act_order: bool,
    smoothquant: float,
    asymmetric: bool = False,
    mse_clip: bool = False,
) -> None:
    if algorithm not in ALGORITHMS:
        raise InputError(f"--algorithm {algorithm!r}: choose from {', '.join(ALGORITHMS)}")
    if algorithm == "gptq" and not 0 < damp < 1:
        raise InputError(f"--damp {damp} must be in (0, 1): the share of H's mean diagonal added to it")
    if act_order and algorithm != "gptq":
        raise InputError("--act-order is a GPTQ option: add --algorithm gptq")
    if smoothquant and method != "int8-dynamic":
        raise InputError(
            f"--smoothquant is for int8 activations (--method int8-dynamic), not --method {method}"
        )
    for flag, on in (("--asymmetric", asymmetric), ("--mse-clip", mse_clip)):
        if on and method != "int4":
            raise InputError(
                f"{flag} is for int4 groups (--method int4), not --method {method}: int8 weights "
                "are symmetric, one scale per output channel"
            )
    if not 0 <= smoothquant <= 1:
        raise InputError(
            f"--smoothquant {smoothquant} must be in (0, 1] (0.5 is the paper's default), or 0 for off"
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
