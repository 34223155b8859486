"""What every compression stage reports: quality, size and speed, before and after, in one shape."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dist_llm.eval.perplexity import run_eval
from dist_llm.files import write_json_atomic
from dist_llm.model.generate import generate
from dist_llm.train.checkpoint import WEIGHTS, load_model

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
    params = {id(p): p for p in model.parameters()}
    buffers = [b for n, b in model.named_buffers() if "qweight" in n]
    n_params = sum(p.numel() for p in params.values()) + sum(b.numel() for b in buffers)
    nonzero = sum(int((p != 0).sum()) for p in params.values()) + sum(int((b != 0).sum()) for b in buffers)
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
        "bytes_on_disk": (Path(checkpoint) / WEIGHTS).stat().st_size,
        "decode_tokens_per_s": speed,
        "threads": torch.get_num_threads(),
    }


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
    from dist_llm.train.checkpoint import saved_config
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
