"""What every compression stage reports: quality, size and speed, before and after, in one shape."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dist_llm.checkpoint import WEIGHTS_ONLY, load_model, saved_config, weight_bytes, write_weights_only
from dist_llm.compress.calibrate import check_source
from dist_llm.eval.perplexity import run_eval
from dist_llm.files import staged_output, write_json_atomic
from dist_llm.model.generate import generate

PROMPT = "Now is the winter of our discontent"


def measure(
    checkpoint: str | Path,
    data: str | None,
    split: str,
    texts: Sequence[str],
    max_batches: int = 0,
    decode_tokens: int = 32,
) -> dict:
    """Perplexity on the given shards or text, parameters, bytes on disk, CPU decode tokens/s."""
    quality = run_eval(checkpoint, data=data, split=split, texts=texts, max_batches=max_batches, device="cpu")
    model, _, tokenizer = load_model(checkpoint, "cpu")
    weights = list(_dense_weights(model))
    n_params = sum(w.numel() for w in weights)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    prompt = tokenizer.encode(PROMPT).ids
    generate(model, prompt, 4)  # warm up
    start = time.perf_counter()
    new = generate(model, prompt, decode_tokens)
    speed = len(new) / (time.perf_counter() - start)
    return {
        "perplexity": quality["perplexity"],
        "loss": quality["loss"],
        "bits_per_byte": quality["bits_per_byte"],
        "eval_tokens": quality["tokens"],
        "parameters": n_params,
        "nonzero_parameters": nonzero,
        "bytes_on_disk": weight_bytes(checkpoint),
        "decode_tokens_per_s": speed,
        "threads": torch.get_num_threads(),
    }


def _dense_weights(model: torch.nn.Module):
    """Every weight as a dense float tensor, whatever stores it (quantized modules dequantized,
    tied weights once), so parameter counts mean the same for every checkpoint."""
    seen = set()
    for module in model.modules():
        if hasattr(module, "dequantize") and hasattr(module, "qweight"):  # our quantized layers
            yield module.dequantize()
        else:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p.detach()


def write_report(out: Path, stage: str, settings: dict, baseline: dict, result: dict) -> dict:
    ratios = {
        "perplexity": result["perplexity"] / baseline["perplexity"],
        "parameters": result["parameters"] / baseline["parameters"],
        "nonzero_parameters": result["nonzero_parameters"] / baseline["nonzero_parameters"],
        "bytes_on_disk": result["bytes_on_disk"] / baseline["bytes_on_disk"],
        "decode_speedup": result["decode_tokens_per_s"] / baseline["decode_tokens_per_s"],
    }
    report = {"stage": stage, "settings": settings, "baseline": baseline, "result": result, "ratios": ratios}
    write_json_atomic(out / "report.json", report)
    _tensorboard(out, stage, result, ratios)
    return report


def _tensorboard(out: Path, stage: str, result: dict, ratios: dict) -> None:
    """Through the trainer's metrics writer: the stage's scalars in <out>/tensorboard."""
    from dist_llm.distributed import World
    from dist_llm.train.metrics import Metrics

    metrics = Metrics(saved_config(out), World(rank=0, size=1, local_rank=0, device=torch.device("cpu")), out)
    values = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "threads"}
    metrics.scalars(0, values | {f"ratio_{k}": v for k, v in ratios.items()}, stage)
    metrics.close()


def summary(report: dict) -> str:
    return json.dumps({"ratios": report["ratios"], "result": report["result"]}, indent=2)


def run_and_report(stage: str, source: Path, out: Path, settings: dict, evaluation: dict) -> dict:
    baseline = measure(source, **evaluation)
    result = measure(out, **evaluation)
    return write_report(out, stage, settings, baseline, result)


def check_evaluation(evaluation: dict) -> None:
    check_source(
        evaluation["data"],
        evaluation["split"],
        evaluation["texts"],
        "the report's evaluation",
        "--eval-data SHARDS or --eval-text FILES (by default --data's val split or --text)",
    )


def save_and_report(
    stage: str,
    source,
    out,
    model: torch.nn.Module,
    config,
    settings: dict,
    evaluation: dict,
    *,
    overwrite: bool,
    extra_meta: dict | None = None,
) -> dict:
    """Write the compressed checkpoint and its report beside `out`, measured there, then swap it
    in, so a failure at any point (the evaluation included) leaves `out` as it was."""
    with staged_output(Path(out), WEIGHTS_ONLY, overwrite) as staging:
        write_weights_only(staging, model.state_dict(), config, source, extra_meta)
        report = run_and_report(stage, Path(source), staging, settings, evaluation)
    return report


def compare(checkpoints: Sequence[str], evaluation: dict) -> list[dict]:
    """Measure several checkpoints the same way; the first is the baseline for the ratios."""
    rows = []
    for path in checkpoints:
        row = {"checkpoint": str(path), **measure(path, **evaluation)}
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / base["perplexity"]
        row["size_ratio"] = row["bytes_on_disk"] / base["bytes_on_disk"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    header = f"{'checkpoint':<40} {'ppl':>9} {'x base':>7} {'params':>11} {'nonzero':>11} {'MB':>8} {'x base':>7} {'tok/s':>7} {'x base':>7}"
    lines = [header]
    for r in rows:
        name = Path(r["checkpoint"]).name if len(r["checkpoint"]) > 40 else r["checkpoint"]
        lines.append(
            f"{name:<40} {r['perplexity']:>9.2f} {r['perplexity_ratio']:>6.2f}x {r['parameters']:>11,} "
            f"{r['nonzero_parameters']:>11,} {r['bytes_on_disk'] / 1e6:>8.1f} {r['size_ratio']:>6.2f}x "
            f"{r['decode_tokens_per_s']:>7.1f} {r['decode_speedup']:>6.2f}x"
        )
    return "\n".join(lines)
