"""The stage registry: every `dist-llm` stage once, with its arguments, its run function and
whether every rank runs it. `dist-llm` (cli.py), `dist-llm submit` and its jobs (launch/) and
slurm/dist-llm.sbatch (`python -m dist_llm.stages --distributed`) all dispatch through `STAGES`.

A run function does exactly what `dist-llm <stage>` does (prints its output, raises the errors the
CLI maps to exit codes) and returns the result a submitit job hands back, if the stage has one.
It imports its heavy modules itself, so that building the parser (`dist-llm --help`) stays fast.
This module imports nothing from cli.py or launch/: they sit above it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dist_llm.data.documents import InputError, ReadOptions


@dataclass(frozen=True)
class Stage:
    """One stage: all the CLI, `dist-llm submit` and the sbatch script need to know about it."""

    name: str  # one word, or two for a stage in a group ("data shard")
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict | None]
    distributed: bool = False  # every rank runs it (torchrun, submitit tasks); else one process
    # A distributed stage's checks that need no process group, run once by a launcher before it
    # starts the ranks (`dist-llm launch`, the sbatch script); returns the checked config.
    check: Callable[[argparse.Namespace], object] | None = None


OVERWRITE_HELP = "replace an existing {} at --out (any other folder there is never replaced)"

# Help for the first word of two-word stages (`dist-llm data --help`).
GROUPS = {
    "config": "inspect configurations",
    "tokenizer": "train a tokenizer",
    "data": "prepare and inspect data",
    "checkpoint": "verify, consolidate and convert checkpoints",
    "lora": "LoRA adapters: merge them into the base weights",
}


def _read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(
        doc_split=args.doc_split,
        text_field=args.text_field,
        prompt_field=getattr(args, "prompt_field", ""),
        response_field=getattr(args, "response_field", ""),
        messages_field=args.messages_field,
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
        "--messages-field",
        default="",
        help="JSONL field that holds a conversation, [{role, content}] (e.g. messages): chat fine-tuning",
    )
    p.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="bad input (e.g. non-UTF-8): stop with an error, or skip it and count it",
    )


def _config_show_args(show: argparse.ArgumentParser) -> None:
    show.add_argument("--config", help="YAML file (see configs/)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")


def cmd_config_show(args: argparse.Namespace) -> None:
    from dist_llm.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")


def _tokenizer_train_args(train: argparse.ArgumentParser) -> None:
    _add_read_args(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="folder for tokenizer.json")
    train.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("tokenizer folder"))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from dist_llm.data.tokenizer import describe, train_tokenizer

    print(
        describe(train_tokenizer(args.input, args.vocab_size, args.out, _read_options(args), args.overwrite))
    )


def _data_shard_args(shard: argparse.ArgumentParser) -> None:
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


def _summary(manifest: dict) -> dict:
    return {
        split: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
        for split, info in manifest["splits"].items()
    } | {"cleaning": manifest["cleaning"]}


def _data_inspect_args(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("--data", required=True, help="dataset folder or URL")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--samples", type=int, default=1)
    inspect.add_argument("--verify", action="store_true", help="read every shard and check its sha256")


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from dist_llm.data.inspect import inspect_dataset

    print(inspect_dataset(args.data, args.split, args.samples, args.verify))


def _train_args(train_p: argparse.ArgumentParser) -> None:
    train_p.add_argument("--config", required=True, help="YAML file (see configs/)")
    train_p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _run_training(args: argparse.Namespace, run) -> dict:
    """train and distill: accelerate launch's DeepSpeed settings (if any) applied, every config
    error raised before any process group, the summary printed by rank 0."""
    result = run(_training_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return result


def _training_config(args: argparse.Namespace):
    from dist_llm.accelerate_config import launcher_overrides
    from dist_llm.config import load_config

    return load_config(args.config, launcher_overrides(args.overrides))


def check_train(args: argparse.Namespace):
    from dist_llm.train.start import preflight

    config = _training_config(args)
    preflight(config)
    return config


def cmd_train(args: argparse.Namespace) -> dict:
    from dist_llm.train.loop import run_train

    return _run_training(args, run_train)


def _eval_args(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", help="sharded dataset (folder or URL)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--text", nargs="+", help="raw UTF-8 text files, scored with a sliding window")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    ev.add_argument("--window", type=int, default=0, help="sliding window for --text; 0 = data.seq_len")
    ev.add_argument(
        "--tasks",
        help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy): scored with "
        "lm-eval instead of perplexity",
    )
    ev.add_argument("--include-path", help="with --tasks: a folder of lm-eval task YAML files")
    ev.add_argument(
        "--limit",
        type=_number(float, 0, low_open=True),
        help="with --tasks: examples per task (<1: a fraction)",
    )


def cmd_eval(args: argparse.Namespace) -> None:
    if args.tasks:
        return _eval_tasks(args)
    if args.include_path or args.limit:
        raise InputError("--include-path and --limit are for lm-eval tasks: pass --tasks too")
    from dist_llm.eval.perplexity import run_eval

    if not args.data and not args.text:
        raise InputError("give --data SHARDS (with --split), --text FILE... or --tasks TASKS")
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


def _eval_tasks(args: argparse.Namespace) -> None:
    if args.data or args.text:
        raise InputError("--tasks scores lm-eval's tasks: --data and --text are for perplexity")
    try:
        from dist_llm.eval.harness import run_tasks
    except ModuleNotFoundError as exc:
        if exc.name != "lm_eval":
            raise
        raise InputError("--tasks needs lm-evaluation-harness: pip install 'dist-llm[eval]'") from None
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = run_tasks(args.checkpoint, args.tasks.split(","), args.include_path, limit, args.batch_size)
    print(json.dumps(results["results"], indent=2))


def _number(kind: type, low: float, high: float = float("inf"), low_open: bool = False):
    """An argparse type: a `kind` number in [low, high] ((low, high] when `low_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            where = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {where}")
        return value

    return parse


def _generate_args(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", required=True, help="text to continue; empty = a new document")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message in the tokenizer's chat template; print the reply, "
        "which ends at the end of the assistant's turn",
    )
    gen.add_argument("--system", default="", help="with --chat: a system message before the prompt")
    gen.add_argument("--max-new-tokens", type=_number(int, 1), default=100)
    gen.add_argument("--temperature", type=_number(float, 0), default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=_number(int, 0), default=0, help="0 = no top-k cut")
    gen.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--truncate-prompt", action="store_true", help="keep the end of a prompt too long for the context"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from dist_llm.checkpoint import load_model
    from dist_llm.model.generate import fit_context, generate

    if args.system and not args.chat:
        raise InputError("--system is a chat message: pass --chat too")
    model, _, tokenizer = load_model(args.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        raise InputError(f"{args.checkpoint} has no tokenizer.json to encode the prompt with")
    prompt, stop_ids = _chat_prompt(args) if args.chat else _text_prompt(args, tokenizer)
    try:
        ids, max_new, notes = fit_context(
            prompt, args.max_new_tokens, model.config.max_seq_len, args.truncate_prompt
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for note in notes:
        print(note, file=sys.stderr)
    new = generate(model, ids, max_new, args.temperature, args.top_k, args.top_p, args.seed, stop_ids)
    if args.chat:  # the reply alone, without its end-of-turn token
        print(tokenizer.decode(new))
        return
    # The prompt as the model saw it (only its kept end when truncated), then the continuation.
    shown = tokenizer.decode(ids) if len(ids) < len(prompt) else args.prompt
    print(shown + tokenizer.decode(new))


def _text_prompt(args: argparse.Namespace, tokenizer) -> tuple[list[int], set[int]]:
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:  # the model was trained on documents that follow an end-of-text token
        if eot is None:
            raise InputError("--prompt is empty and the tokenizer has no <|endoftext|> to start from")
        print("empty prompt: sampling a new document after <|endoftext|>", file=sys.stderr)
        ids = [eot]
    return ids, {eot} - {None}


def _chat_prompt(args: argparse.Namespace) -> tuple[list[int], set[int]]:
    from dist_llm.data.chat import ChatEncoder, ChatError

    chat = ChatEncoder(args.checkpoint)
    try:
        return chat.prompt_ids(args.prompt, args.system), chat.stop_ids()
    except ChatError as exc:
        raise InputError(str(exc)) from None


def _export_hf_args(exp: argparse.ArgumentParser) -> None:
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("Hugging Face export"))


def cmd_export_hf(args: argparse.Namespace) -> None:
    from dist_llm.interop.hf import export_hf

    print(f"wrote {export_hf(args.checkpoint, args.out, args.overwrite)}")


def _export_gguf_args(exp: argparse.ArgumentParser) -> None:
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True, help="a folder; the file is <out>/model.gguf")
    exp.add_argument(
        "--outtype",
        default="f16",
        choices=["f16", "q8_0", "q4_0"],
        help="tensor type of the matrices (norms stay F32; q4_0 keeps the embedding and head at Q8_0)",
    )
    exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("GGUF export"))


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from dist_llm.interop.gguf import export_gguf

    print(f"wrote {export_gguf(args.checkpoint, args.out, args.outtype, args.overwrite)}")


def _import_hf_args(imp: argparse.ArgumentParser) -> None:
    imp.add_argument("--model", required=True, help="folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True)
    imp.add_argument("--seq-len", type=int, default=2048, help="data.seq_len recorded in the checkpoint")
    imp.add_argument(
        "--overwrite", action="store_true", help=OVERWRITE_HELP.format("weights-only checkpoint")
    )


def cmd_import_hf(args: argparse.Namespace) -> None:
    from dist_llm.interop.hf import import_hf

    print(f"wrote {import_hf(args.model, args.out, args.seq_len, args.overwrite)}")


def _checkpoint_verify_args(verify: argparse.ArgumentParser) -> None:
    verify.add_argument(
        "checkpoint", metavar="DIR", help="a checkpoint folder (step_N/ of a run, or weights-only)"
    )


def cmd_checkpoint_verify(args: argparse.Namespace) -> None:
    from dist_llm.checkpoint.verify import verify_checkpoint

    print(verify_checkpoint(args.checkpoint))


def _checkpoint_consolidate_args(cons: argparse.ArgumentParser) -> None:
    cons.add_argument("checkpoint", metavar="DIR", help="a training checkpoint folder")
    cons.add_argument("--out", required=True, help="the weights-only checkpoint to write")
    cons.add_argument(
        "--overwrite", action="store_true", help=OVERWRITE_HELP.format("weights-only checkpoint")
    )


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> None:
    from dist_llm.checkpoint.consolidate import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out, args.overwrite)}")


def _checkpoint_convert_args(conv: argparse.ArgumentParser) -> None:
    conv.add_argument(
        "checkpoint", metavar="OLD", help="a training checkpoint from before sharded checkpoints"
    )
    conv.add_argument("--out", help="where to write the sharded copy (default: OLD.sharded, beside OLD)")
    conv.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("converted checkpoint"))


def cmd_checkpoint_convert(args: argparse.Namespace) -> None:
    from dist_llm.checkpoint.convert import convert

    out = convert(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {out} ({args.checkpoint} is unchanged); resume from it with checkpoint.resume={out}")


def _distill_args(dist_p: argparse.ArgumentParser) -> None:
    dist_p.add_argument("--config", required=True, help="YAML file with a distill: section")
    dist_p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def check_distill(args: argparse.Namespace):
    from dist_llm.compress.distill import prepare
    from dist_llm.train.start import preflight

    config = prepare(_training_config(args))
    preflight(config, custom_objective=True)
    return config


def cmd_distill(args: argparse.Namespace) -> dict:
    from dist_llm.compress.distill import run_distill  # checks teacher and student first

    return _run_training(args, run_distill)


def _dpo_args(dpo_p: argparse.ArgumentParser) -> None:
    dpo_p.add_argument("--config", required=True, help="YAML file with a dpo: section (configs/dpo.yaml)")
    dpo_p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def check_dpo(args: argparse.Namespace):
    from dist_llm.data.pairs import read_pairs
    from dist_llm.train.dpo import prepare
    from dist_llm.train.start import preflight

    config = prepare(_training_config(args))
    read_pairs(config.dpo.data, config.checkpoint.init_from, config.data.seq_len)  # names a bad line
    preflight(config, custom_objective=True, own_data=True)
    return config


def cmd_dpo(args: argparse.Namespace) -> dict:
    from dist_llm.train.dpo import run_dpo  # checks the pairs and the policy first

    return _run_training(args, run_dpo)


def _lora_merge_args(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("--checkpoint", required=True, help="a checkpoint of a LoRA run (lora.rank > 0)")
    merge.add_argument("--out", required=True, help="the weights-only checkpoint to write")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing weights-only --out")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from dist_llm.train.lora import merge

    out = merge(args.checkpoint, args.out, args.overwrite)
    print(
        f"wrote {out}: the base with the adapters of {args.checkpoint} merged in (eval, generate, export-hf)"
    )


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


def _prune_args(prune: argparse.ArgumentParser) -> None:
    _add_compress_args(prune)
    prune.add_argument(
        "--method", required=True, choices=["magnitude", "wanda", "mlp", "heads", "layers", "embedding"]
    )
    prune.add_argument("--sparsity", type=float, default=0.5, help="magnitude/wanda: share of weights zeroed")
    prune.add_argument(
        "--pattern", default="", help="magnitude/wanda: N:M pattern such as 2:4 (overrides --sparsity)"
    )
    prune.add_argument("--ratio", type=float, default=0.25, help="structured: share of units removed")


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


def _quantize_args(quant: argparse.ArgumentParser) -> None:
    _add_compress_args(quant)
    quant.add_argument("--method", required=True, choices=["int8", "int4", "int8-dynamic"])
    quant.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="int4: inputs sharing one scale (must divide every block linear's input width)",
    )
    quant.add_argument(
        "--algorithm",
        default="rtn",
        choices=["rtn", "gptq"],
        help="rtn: round to nearest; gptq: error-compensating, calibrated on --data/--text",
    )
    quant.add_argument("--damp", type=float, default=0.01, help="gptq: share of H's mean diagonal added")
    quant.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing H_ii")
    quant.add_argument(
        "--asymmetric",
        action="store_true",
        help="int4: codes 0..15 with an integer zero point per group (min/max range), not symmetric -8..7",
    )
    quant.add_argument(
        "--mse-clip",
        action="store_true",
        help="int4: each group's range shrunk to minimise its |w - Q(w)|^2.4 (GPTQ's mse search)",
    )
    quant.add_argument(
        "--smoothquant",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="int8-dynamic: SmoothQuant migration strength (0 = off, the default; 0.75 measured best on "
        "SmolLM2 with per-token activations, 0.5 the paper's), calibrated on --data/--text",
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from dist_llm.compress.quantize import run_quantize
    from dist_llm.compress.report import summary

    report = run_quantize(
        args.checkpoint,
        args.out,
        args.method,
        args.group_size,
        _evaluation(args),
        args.overwrite,
        algorithm=args.algorithm,
        calibration=_calibration(args),
        damp=args.damp,
        act_order=args.act_order,
        smoothquant=args.smoothquant,
        asymmetric=args.asymmetric,
        mse_clip=args.mse_clip,
    )
    print(summary(report))


def _compare_args(cmp: argparse.ArgumentParser) -> None:
    cmp.add_argument("checkpoints", nargs="+", help="the first one is the baseline")
    cmp.add_argument("--eval-data")
    cmp.add_argument("--eval-split", default="val")
    cmp.add_argument("--eval-text", nargs="+")
    cmp.add_argument("--eval-batches", type=int, default=0)
    cmp.add_argument("--json", help="also write the rows to this file")


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


def _plan_args(plan: argparse.ArgumentParser) -> None:
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


def cmd_plan(args: argparse.Namespace) -> None:
    from dist_llm.config import load_config
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
    if config.model.moe.num_experts:
        from dist_llm.plan.memory import active_parameter_count, parameter_count

        total, active = parameter_count(config.model), active_parameter_count(config.model)
        print(f"mixture of experts: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
    print(
        f"{config.model.n_layers} layers, d={config.model.dim}, seq {config.data.seq_len}, global batch "
        f"{args.global_batch} sequences on {args.gpus} x {gpu.name}: {len(rows)} layouts, {fitting} fit in "
        f"90% of {gpu.memory_gb:.0f} GB"
    )
    print(format_table(rows, args.top))


# In `dist-llm --help` order. `submit` is not here: it is a launcher of these stages
# (launch/submit.py), and cli.py adds it to the command line.
STAGES = (
    Stage("config show", "print the resolved configuration", _config_show_args, cmd_config_show),
    Stage("tokenizer train", "train byte-level BPE on raw text", _tokenizer_train_args, cmd_tokenizer_train),
    Stage(
        "data shard", "clean, tokenize and pack text into WebDataset shards", _data_shard_args, cmd_data_shard
    ),
    Stage(
        "data inspect",
        "summarize a sharded dataset and decode a few samples",
        _data_inspect_args,
        cmd_data_inspect,
    ),
    Stage(
        "train",
        "train a model (one process, torchrun or deepspeed launcher)",
        _train_args,
        cmd_train,
        distributed=True,
        check=check_train,
    ),
    Stage("eval", "loss, perplexity and bits per byte of a checkpoint", _eval_args, cmd_eval),
    Stage("generate", "sample a continuation with a KV cache", _generate_args, cmd_generate),
    Stage(
        "export-hf",
        "checkpoint -> Hugging Face Llama folder (safetensors + config)",
        _export_hf_args,
        cmd_export_hf,
    ),
    Stage(
        "export-gguf",
        "checkpoint -> GGUF file for llama.cpp / ollama (F16, Q8_0, Q4_0)",
        _export_gguf_args,
        cmd_export_gguf,
    ),
    Stage(
        "import-hf",
        "Hugging Face Llama-family folder -> weights-only checkpoint",
        _import_hf_args,
        cmd_import_hf,
    ),
    Stage(
        "checkpoint verify",
        "check a checkpoint's files: sizes, shard hashes",
        _checkpoint_verify_args,
        cmd_checkpoint_verify,
    ),
    Stage(
        "checkpoint consolidate",
        "training checkpoint -> weights-only checkpoint, one tensor at a time",
        _checkpoint_consolidate_args,
        cmd_checkpoint_consolidate,
    ),
    Stage(
        "checkpoint convert",
        "checkpoint from before sharding -> sharded checkpoint that resumes",
        _checkpoint_convert_args,
        cmd_checkpoint_convert,
    ),
    Stage(
        "distill",
        "train a student against a frozen teacher (same launchers as train)",
        _distill_args,
        cmd_distill,
        distributed=True,
        check=check_distill,
    ),
    Stage(
        "dpo",
        "preference-tune a model on chosen/rejected pairs (same launchers as train)",
        _dpo_args,
        cmd_dpo,
        distributed=True,
        check=check_dpo,
    ),
    Stage(
        "lora merge",
        "LoRA run's checkpoint -> weights-only checkpoint with the adapters merged in",
        _lora_merge_args,
        cmd_lora_merge,
    ),
    Stage("prune", "sparsify or structurally shrink a checkpoint", _prune_args, cmd_prune),
    Stage("quantize", "int8 / int4 weight-only or int8 dynamic quantization", _quantize_args, cmd_quantize),
    Stage("compare", "perplexity, size and speed of checkpoints side by side", _compare_args, cmd_compare),
    Stage("plan", "memory and speed of every layout for N GPUs, before renting them", _plan_args, cmd_plan),
)


def add_stages(parser: argparse.ArgumentParser, stages: Sequence[Stage]) -> None:
    """One subcommand per stage, two-word names under their group; `args.stage_def` is the Stage."""
    top = parser.add_subparsers(dest="stage", required=True)
    groups = {}
    for stage in stages:
        group, _, action = stage.name.partition(" ")
        if not action:
            sub = top.add_parser(stage.name, help=stage.help)
        else:
            if group not in groups:
                groups[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest="action", required=True
                )
            sub = groups[group].add_parser(action, help=stage.help)
        stage.add_arguments(sub)
        sub.set_defaults(stage_def=stage)


def parse(argv: Sequence[str]) -> tuple[Stage, argparse.Namespace]:
    """A stage's own command line (`train --config F ...`), as a launcher's job runs it."""
    parser = argparse.ArgumentParser(prog="dist-llm")
    add_stages(parser, STAGES)
    args = parser.parse_args(argv)
    return args.stage_def, args


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dist_llm.stages [--distributed]`: the stage names, one a line, for shell scripts."""
    parser = argparse.ArgumentParser(prog="python -m dist_llm.stages", description=main.__doc__)
    parser.add_argument("--distributed", action="store_true", help="only the stages every rank runs")
    args = parser.parse_args(argv)
    for stage in STAGES:
        if stage.distributed or not args.distributed:
            print(stage.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
