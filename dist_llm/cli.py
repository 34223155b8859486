"""`dist-llm <stage>`: parse arguments, load the config, call one stage function. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_llm.config import ConfigError, dump_yaml, load_config
from dist_llm.data.documents import InputError, ReadOptions
from dist_llm.data.manifest import DataError
from dist_llm.errors import PREEMPTED_EXIT, CheckpointError, Preempted, TrainingDiverged
from dist_llm.launch import submit as submit_launcher
from dist_llm.launch.accelerate import launcher_overrides

OVERWRITE_HELP = "replace an existing {} at --out (any other folder there is never replaced)"


def _read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(
        doc_split=args.doc_split,
        text_field=args.text_field,
        prompt_field=getattr(args, "prompt_field", ""),
        response_field=getattr(args, "response_field", ""),
        on_error=args.on_error,
    )


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="files, folders or globs (.txt/.md/.jsonl[.gz])")
    p.add_argument(
        "--doc-split",
        choices=["file", "line", "blank-line"],
        default="file",
        help="how .txt/.md files are cut into documents (default: one per file)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field that holds a document")
    p.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="bad input (e.g. non-UTF-8): stop with an error, or skip it and count it",
    )


def cmd_config_show(args: argparse.Namespace) -> None:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from dist_llm.data.tokenizer import describe, train_tokenizer

    print(
        describe(train_tokenizer(args.input, args.vocab_size, args.out, _read_options(args), args.overwrite))
    )


def cmd_data_shard(args: argparse.Namespace) -> None:
    from dist_llm.data.shard import ShardOptions, shard_corpus

    opts = ShardOptions(
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        mask_pii=args.mask_pii,
        overwrite=args.overwrite,
        read=_read_options(args),
    )
    manifest = shard_corpus(args.input, args.tokenizer, args.out, opts)
    print(json.dumps(_summary(manifest), indent=2))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from dist_llm.data.inspect import inspect_dataset

    print(inspect_dataset(args.data, args.split, args.samples, args.verify))


def cmd_train(args: argparse.Namespace) -> None:
    from dist_llm.train.loop import run_train

    overrides = launcher_overrides(args.overrides)  # accelerate launch's DeepSpeed settings, if any
    config = load_config(args.config, overrides)  # all config errors before any process group
    result = run_train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from dist_llm.eval.perplexity import run_eval

    if not args.data and not args.text:
        raise InputError("give --data SHARDS (with --split) or --text FILE...")
    result = run_eval(
        args.checkpoint,
        args.data,
        args.split,
        args.text or (),
        args.batch_size,
        args.max_batches,
        args.window,
    )
    print(json.dumps(result, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from dist_llm.model.generate import generate
    from dist_llm.train.checkpoint import load_model

    model, _, tokenizer = load_model(args.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        raise InputError(f"{args.checkpoint} has no tokenizer.json to encode the prompt with")
    ids = tokenizer.encode(args.prompt).ids
    eot = tokenizer.token_to_id("<|endoftext|>")
    new = generate(
        model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, stop_id=eot
    )
    print(args.prompt + tokenizer.decode(new))


def cmd_export_hf(args: argparse.Namespace) -> None:
    from dist_llm.interop.hf import export_hf

    print(f"wrote {export_hf(args.checkpoint, args.out, args.overwrite)}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from dist_llm.interop.hf import import_hf

    print(f"wrote {import_hf(args.model, args.out, args.seq_len, args.overwrite)}")


def _calibration(args: argparse.Namespace) -> dict:
    return {
        "data": args.data,
        "split": args.split,
        "texts": args.text or (),
        "samples": args.calib_samples,
        "seq_len": args.calib_seq_len,
    }


def _evaluation(args: argparse.Namespace) -> dict:
    data, texts = args.eval_data, args.eval_text or ()
    if not data and not texts:  # default: the calibration source's validation split / the same text
        data, texts = args.data, args.text or ()
    return {
        "data": data,
        "split": "val" if data and not args.eval_data else args.eval_split,
        "texts": texts,
        "max_batches": args.eval_batches,
    }


def cmd_prune(args: argparse.Namespace) -> None:
    from dist_llm.compress.prune import run_prune
    from dist_llm.compress.report import summary

    amount = args.sparsity if args.method in ("magnitude", "wanda") else args.ratio
    print(
        summary(
            run_prune(
                args.checkpoint,
                args.out,
                args.method,
                amount,
                args.pattern,
                _calibration(args),
                _evaluation(args),
                args.overwrite,
            )
        )
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from dist_llm.compress.quantize import run_quantize
    from dist_llm.compress.report import summary

    report = run_quantize(
        args.checkpoint, args.out, args.method, args.group_size, _evaluation(args), args.overwrite
    )
    print(summary(report))


def cmd_compare(args: argparse.Namespace) -> None:
    from dist_llm.compress.report import compare, table

    evaluation = {
        "data": args.eval_data,
        "split": args.eval_split,
        "texts": args.eval_text or (),
        "max_batches": args.eval_batches,
    }
    if not args.eval_data and not args.eval_text:
        raise InputError("give --eval-data SHARDS or --eval-text FILES to measure perplexity on")
    rows = compare(args.checkpoints, evaluation)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def cmd_plan(args: argparse.Namespace) -> None:
    from dist_llm.plan.speed import GPUS, Gpu, enumerate_layouts, format_table

    config = load_config(args.config, args.overrides)
    if args.gpu == "custom":
        if not (args.peak_tflops and args.memory_gb and args.bandwidth_gbps):
            raise InputError("--gpu custom needs --peak-tflops, --memory-gb and --bandwidth-gbps")
        gpu = Gpu("custom", args.peak_tflops, args.memory_gb, args.bandwidth_gbps, args.bandwidth_gbps / 8)
    else:
        gpu = GPUS[args.gpu]
    rows = enumerate_layouts(
        config.model, args.gpus, args.global_batch, config.data.seq_len, gpu, config.train.dtype
    )
    if not rows:
        raise InputError(f"no valid layout for {args.gpus} GPUs and a global batch of {args.global_batch}")
    if args.json:
        print(json.dumps(rows[: args.top], indent=2))
        return
    fitting = sum(r["fits"] for r in rows)
    print(
        f"{config.model.n_layers} layers, d={config.model.dim}, seq {config.data.seq_len}, global batch "
        f"{args.global_batch} sequences on {args.gpus} x {gpu.name}: {len(rows)} layouts, {fitting} fit in "
        f"90% of {gpu.memory_gb:.0f} GB"
    )
    print(format_table(rows, args.top))


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("weights-only checkpoint"))
    p.add_argument("--data", help="calibration shards (folder or URL)")
    p.add_argument("--split", default="train", help="calibration split of --data")
    p.add_argument("--text", nargs="+", help="calibration text files")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-data", help="shards for the report's perplexity (default: --data's val split)")
    p.add_argument("--eval-split", default="val")
    p.add_argument("--eval-text", nargs="+", help="text files for the report's perplexity (default: --text)")
    p.add_argument("--eval-batches", type=int, default=0, help="0 = the whole split")


def cmd_distill(args: argparse.Namespace) -> None:
    from dist_llm.compress.distill import prepare, run_distill

    config = load_config(args.config, launcher_overrides(args.overrides))
    prepare(config)  # teacher and student checks before any process group
    result = run_distill(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))


def _summary(manifest: dict) -> dict:
    return {
        split: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
        for split, info in manifest["splits"].items()
    } | {"cleaning": manifest["cleaning"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    stages = parser.add_subparsers(dest="stage", required=True)

    config = stages.add_parser("config", help="inspect configurations").add_subparsers(
        dest="action", required=True
    )
    show = config.add_parser("show", help="print the resolved configuration")
    show.add_argument("--config", help="YAML file (see configs/)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.set_defaults(func=cmd_config_show)

    tok = stages.add_parser("tokenizer", help="train a tokenizer").add_subparsers(
        dest="action", required=True
    )
    train = tok.add_parser("train", help="train byte-level BPE on raw text")
    _add_read_args(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="folder for tokenizer.json")
    train.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("tokenizer folder"))
    train.set_defaults(func=cmd_tokenizer_train)

    data = stages.add_parser("data", help="prepare and inspect data").add_subparsers(
        dest="action", required=True
    )
    shard = data.add_parser("shard", help="clean, tokenize and pack text into WebDataset shards")
    _add_read_args(shard)
    shard.add_argument("--prompt-field", default="", help="JSONL prompt field (not trained on)")
    shard.add_argument("--response-field", default="", help="JSONL response field (trained on)")
    shard.add_argument("--tokenizer", required=True, help="folder or tokenizer.json")
    shard.add_argument("--seq-len", type=int, required=True)
    shard.add_argument("--out", required=True)
    shard.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    shard.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    shard.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    shard.add_argument("--mask-pii", action="store_true", help="mask e-mail addresses, IPs and phone numbers")
    shard.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("dataset"))
    shard.set_defaults(func=cmd_data_shard)

    train_p = stages.add_parser("train", help="train a model (one process, torchrun or deepspeed launcher)")
    train_p.add_argument("--config", required=True, help="YAML file (see configs/)")
    train_p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train_p.set_defaults(func=cmd_train)

    ev = stages.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", help="sharded dataset (folder or URL)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--text", nargs="+", help="raw UTF-8 text files, scored with a sliding window")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    ev.add_argument("--window", type=int, default=0, help="sliding window for --text; 0 = data.seq_len")
    ev.set_defaults(func=cmd_eval)

    gen = stages.add_parser("generate", help="sample a continuation with a KV cache")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    exp = stages.add_parser(
        "export-hf", help="checkpoint -> Hugging Face Llama folder (safetensors + config)"
    )
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("Hugging Face export"))
    exp.set_defaults(func=cmd_export_hf)

    imp = stages.add_parser("import-hf", help="Hugging Face Llama-family folder -> weights-only checkpoint")
    imp.add_argument("--model", required=True, help="folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True)
    imp.add_argument("--seq-len", type=int, default=2048, help="data.seq_len recorded in the checkpoint")
    imp.add_argument(
        "--overwrite", action="store_true", help=OVERWRITE_HELP.format("weights-only checkpoint")
    )
    imp.set_defaults(func=cmd_import_hf)

    dist_p = stages.add_parser(
        "distill", help="train a student against a frozen teacher (same launchers as train)"
    )
    dist_p.add_argument("--config", required=True, help="YAML file with a distill: section")
    dist_p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    dist_p.set_defaults(func=cmd_distill)

    prune = stages.add_parser("prune", help="sparsify or structurally shrink a checkpoint")
    _add_compress_args(prune)
    prune.add_argument(
        "--method", required=True, choices=["magnitude", "wanda", "mlp", "heads", "layers", "embedding"]
    )
    prune.add_argument("--sparsity", type=float, default=0.5, help="magnitude/wanda: share of weights zeroed")
    prune.add_argument(
        "--pattern", default="", help="magnitude/wanda: N:M pattern such as 2:4 (overrides --sparsity)"
    )
    prune.add_argument("--ratio", type=float, default=0.25, help="structured: share of units removed")
    prune.set_defaults(func=cmd_prune)

    quant = stages.add_parser("quantize", help="int8 / int4 weight-only or int8 dynamic quantization")
    _add_compress_args(quant)
    quant.add_argument("--method", required=True, choices=["int8", "int4", "int8-dynamic"])
    quant.add_argument("--group-size", type=int, default=64, help="int4: inputs sharing one scale")
    quant.set_defaults(func=cmd_quantize)

    cmp = stages.add_parser("compare", help="perplexity, size and speed of checkpoints side by side")
    cmp.add_argument("checkpoints", nargs="+", help="the first one is the baseline")
    cmp.add_argument("--eval-data")
    cmp.add_argument("--eval-split", default="val")
    cmp.add_argument("--eval-text", nargs="+")
    cmp.add_argument("--eval-batches", type=int, default=0)
    cmp.add_argument("--json", help="also write the rows to this file")
    cmp.set_defaults(func=cmd_compare)

    plan = stages.add_parser("plan", help="memory and speed of every layout for N GPUs, before renting them")
    plan.add_argument("--config", required=True)
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpu", choices=["h100", "h200", "a100", "custom"], default="h100")
    plan.add_argument("--peak-tflops", type=float, default=0.0, help="--gpu custom: dense bf16 TFLOP/s")
    plan.add_argument("--memory-gb", type=float, default=0.0, help="--gpu custom: memory per GPU")
    plan.add_argument(
        "--bandwidth-gbps", type=float, default=0.0, help="--gpu custom: intra-node GB/s per GPU"
    )
    plan.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    plan.add_argument("--top", type=int, default=15)
    plan.add_argument("--json", action="store_true")
    plan.add_argument("overrides", nargs="*")
    plan.set_defaults(func=cmd_plan)

    sub = stages.add_parser(
        "submit", help="run any stage as a submitit job: SLURM, local processes, in process"
    )
    submit_launcher.add_arguments(sub)
    sub.set_defaults(func=submit_launcher.cmd_submit)

    inspect = data.add_parser("inspect", help="summarize a sharded dataset and decode a few samples")
    inspect.add_argument("--data", required=True, help="dataset folder or URL")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--samples", type=int, default=1)
    inspect.add_argument("--verify", action="store_true", help="read every shard and check its sha256")
    inspect.set_defaults(func=cmd_data_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the same value is in $LOCAL_RANK.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except (ConfigError, InputError, DataError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        code = PREEMPTED_EXIT
    else:
        code = 0
    if args.stage in ("train", "distill", "submit") and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            from dist_llm.distributed import finish_process

            finish_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
