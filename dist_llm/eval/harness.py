"""lm-evaluation-harness model `dist-llm`: a checkpoint scored and sampled as lm-eval's own `hf`
model does it (same tokenization of context and continuation, same windows, same stop rules),
so that a checkpoint and its Hugging Face export get the same scores.

lm-eval knows a model only once the module that registers it is imported: `dist-llm eval --tasks`
imports this one, and `python -m dist_llm.eval.harness ARGS` is lm-eval's command line with it
registered (`--model dist-llm --model_args checkpoint=DIR --tasks ...`). Nothing else imports
it, so lm-eval's slow imports stay out of `import dist_llm`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from dist_llm.checkpoint import load_model
from dist_llm.data.documents import InputError
from dist_llm.data.tokenizer import EOT
from dist_llm.model.generate import generate

# What a task may ask of generate_until; anything else (beam search, repetition penalty) is an
# error rather than a setting that is silently not applied.
SAMPLING_KWARGS = {"do_sample", "temperature", "top_k", "top_p"}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` default, for tasks that do not set max_gen_toks

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings or None, context, continuation)


@register_model("dist-llm")
class DistLLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
        max_batch_size: int | None = None,  # simple_evaluate passes it to every model; no 'auto' here
    ):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise InputError(f"batch_size={batch_size}: dist-llm needs a positive number (no 'auto')")
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda:0 unless told otherwise (its EvaluatorConfig default).
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.config, self._tokenizer = load_model(checkpoint, device)
        if self._tokenizer is None:
            raise InputError(f"{checkpoint} has no tokenizer.json; lm-eval scores text, not tokens")
        self.checkpoint = str(checkpoint)
        self._bos, self._eos = self._special_ids(Path(checkpoint))
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = self.config.model.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    def _special_ids(self, checkpoint: Path) -> tuple[int, int]:
        """(the prefix of an empty context and of rolling windows, end of generation): the BOS
        and EOS of tokenizer_config.json, as `hf` takes them from transformers (an imported
        model's own, <|endoftext|> for both in a tokenizer trained here), else <|endoftext|>."""
        path = checkpoint / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        eot = self._tokenizer.token_to_id(EOT)

        def token_id(key: str) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token  # AddedToken form
            return self._tokenizer.token_to_id(token) if token else None

        eos = token_id("eos_token")
        eos = eot if eos is None else eos
        if eos is None:
            raise InputError(f"{checkpoint}: the tokenizer has no eos_token and no {EOT}")
        bos = token_id("bos_token")
        return (eos if bos is None else bos), eos

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Our tokenizer adds no special tokens, as the exported one does not: nothing to switch.
        return self._tokenizer.encode(string).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------ loglikelihood

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is it the greedy continuation) for each request, in
        batches of similar length. As `hf` does: requests that differ only in a one-token
        continuation share one forward pass (multiple choice with one-word answers), and a
        context too long for the model loses its oldest tokens."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dist-llm loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            # The last token is only predicted, never an input.
            rows = [
                (context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in chunk
            ]
            logprobs = F.log_softmax(self._forward(rows), dim=-1)
            for (strings, context, continuation), row, row_logprobs in zip(
                chunk, rows, logprobs, strict=True
            ):
                scored = row_logprobs[len(row) - len(continuation) : len(row)].unsqueeze(0)
                for key, tokens, lp in collator.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=scored
                ):
                    results.append(self._score(lp, tokens))
                    if key is not None:  # rolling windows are cached per document instead
                        self.cache_hook.add_partial("loglikelihood", key, results[-1])
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Float logits [B, T, vocab] of right-padded rows: causal attention, so the padding
        changes nothing before it."""
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return self.model(ids.to(self._device)).float()

    def _score(self, logprobs: torch.Tensor, tokens: list[int]) -> tuple[float, bool]:
        # `logprobs` may be longer than `tokens` (a shared pass): the continuation is its end.
        target = torch.tensor(tokens, device=logprobs.device).unsqueeze(0)
        greedy = bool((logprobs.argmax(-1)[:, -target.shape[1] :] == target).all())
        logprobs = logprobs[:, -target.shape[1] :]
        return float(torch.gather(logprobs, 2, target.unsqueeze(-1)).sum()), greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood after the prefix token, in windows of the model's
        context that predict every token once (lm-eval's rolling windows, as `hf` makes them)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One request at a time with the KV cache; stops at end of text, at any `until` string
        (which is cut from the answer) or after max_gen_toks."""
        eos = self._tokenizer.id_to_token(self.eot_token_id)
        out = []
        for i, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="dist-llm generate_until")):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            text = postprocess_generated_text(
                self.tok_decode(self._generate(context, max_new, until, kwargs, self.seed + i)), until, None
            )
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate(self, context: str, max_new: int, until: list[str], kwargs: dict, seed: int) -> list[int]:
        unknown = set(kwargs) - SAMPLING_KWARGS
        if unknown:
            raise InputError(f"dist-llm generation does not support {', '.join(sorted(unknown))}")
        if max_new >= self.max_length:
            raise InputError(
                f"max_gen_toks {max_new} leaves no room for a prompt in the context of {self.max_length}"
            )
        # As `hf`: the prompt keeps its most recent tokens, leaving room for max_new tokens.
        prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
        stops = [s for s in until if s]
        return generate(
            self.model,
            prompt,
            max_new,
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            seed=seed,
            stop_ids={self.eot_token_id},
            stop=lambda new: any(s in self.tok_decode(new) for s in stops),
        )


def run_tasks(
    checkpoint: str,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    bootstrap_iters: int = 100_000,
) -> dict:
    """lm-eval's simple_evaluate of `tasks` (lm-eval's own, or those in the task YAML files
    under `include_path`) on the checkpoint: its whole result, samples included."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)  # an unknown task before the model loads
    return simple_evaluate(
        model=DistLLM(checkpoint, device, batch_size),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
    )


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's index of the tasks to run, or an InputError naming those it lacks. Indexing
    lm-eval's ~15,000 built-in tasks takes 10-20 s on 2 cores: tasks that are all found under
    `include_path` skip it."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" (lm-eval's own or under {include_path})" if include_path else " among lm-eval's"
        raise InputError(f"--tasks: no task {', '.join(unknown)}{where}; `lm-eval ls tasks` lists them")
    return manager


def main() -> None:
    """lm-eval's own command line, with `dist-llm` among its models."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
