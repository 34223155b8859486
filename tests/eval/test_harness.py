"""The lm-eval model `dist-llm` against lm-eval's own `hf` model on the same checkpoint exported
to Hugging Face: three local tasks (multiple choice, rolling perplexity, generation), each run
once per model in one simple_evaluate call, offline."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dist_llm.checkpoint import save_weights_only
from dist_llm.cli import main
from dist_llm.config import load_config
from dist_llm.data.tokenizer import load_tokenizer
from dist_llm.interop.hf import export_hf
from tests.checkpoint.builders import model_state
from tests.eval.harness_tasks import NAMES, write_tasks

CONFIG = Path(__file__).resolve().parents[2] / "configs/tiny.yaml"


def lines_end(weights: dict, tokenizer_dir: Path) -> dict:
    """Random weights whose greedy lines end after different numbers of tokens: the newline's
    output row is a multiple of another token's, so it wins wherever that one leads enough."""
    tokenizer = load_tokenizer(tokenizer_dir)
    out = weights["output.weight"].clone()
    out[tokenizer.token_to_id("Ċ")] = 3 * out[tokenizer.token_to_id("Ġthe")]
    return {**weights, "output.weight": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plays, tokenizer_dir):
    """(tasks folder, checkpoint, our simple_evaluate result, hf's)."""
    tmp = tmp_path_factory.mktemp("harness")
    config = load_config(CONFIG)
    checkpoint = save_weights_only(
        tmp / "ckpt", lines_end(model_state(config, seed=1), tokenizer_dir), config, tokenizer_dir
    )
    exported = export_hf(checkpoint, tmp / "hf")
    tasks = write_tasks(tmp / "tasks", plays)
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, tmp / "datasets")
        from lm_eval import simple_evaluate

        from dist_llm.eval.harness import run_tasks, task_manager

        ours = run_tasks(str(checkpoint), NAMES, str(tasks), batch_size=8, bootstrap_iters=0)
        hf = simple_evaluate(
            model="hf",
            model_args=f"pretrained={exported},dtype=float32",
            device="cpu",
            batch_size=8,
            tasks=list(NAMES),
            task_manager=task_manager(NAMES, str(tasks)),
            bootstrap_iters=0,
        )
    return tasks, checkpoint, ours, hf


def offline(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """datasets and the hub never reach the network, and datasets caches under `cache`: the
    environment for a later import, the modules' settings for an earlier one."""
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        mp.setenv(name, value)
    mp.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def metrics(result: dict, task: str) -> dict:
    """The task's scores (their stderr is "N/A": no bootstrap)."""
    return {k: v for k, v in result["results"][task].items() if k.endswith(",none") and "stderr" not in k}


def responses(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_every_metric_is_hfs(runs):
    _, _, ours, hf = runs
    for task in NAMES:
        assert metrics(ours, task).keys() == metrics(hf, task).keys()
        for name, value in metrics(ours, task).items():
            assert value == pytest.approx(metrics(hf, task)[name], rel=1e-6, abs=1e-6), (task, name)


def test_multiple_choice_scores_each_continuation_as_hf(runs):
    _, _, ours, hf = runs
    for mine, theirs in zip(responses(ours, "shakespeare_mc"), responses(hf, "shakespeare_mc"), strict=True):
        assert [r[0][1] for r in mine] == [r[0][1] for r in theirs]  # is_greedy
        assert [r[0][0] for r in mine] == pytest.approx([r[0][0] for r in theirs], rel=1e-6)
    # A model that always picks the same place would pass on an off-by-one of the context.
    picked = {max(range(4), key=lambda i: s["resps"][i][0][0]) for s in ours["samples"]["shakespeare_mc"]}
    assert len(picked) > 1
    assert 0 < ours["results"]["shakespeare_mc"]["acc,none"] < 1


def test_rolling_windows_cover_documents_longer_than_the_context(runs, tokenizer_dir):
    _, _, ours, hf = runs
    lengths = [
        len(load_tokenizer(tokenizer_dir).encode(s["target"]).ids) for s in ours["samples"]["shakespeare_ppl"]
    ]
    assert max(lengths) > 2 * load_config(CONFIG).model.max_seq_len  # three windows or more
    mine, theirs = responses(ours, "shakespeare_ppl"), responses(hf, "shakespeare_ppl")
    assert [r[0][0] for r in mine] == pytest.approx([r[0][0] for r in theirs], rel=1e-6)


def test_greedy_generation_is_hfs_and_stops_at_until(runs):
    _, _, ours, hf = runs
    mine = [r[0][0] for r in responses(ours, "shakespeare_gen")]
    assert mine == [r[0][0] for r in responses(hf, "shakespeare_gen")]
    assert all("\n" not in text for text in mine)
    # Some lines ended at the newline, before max_gen_toks: the stop sequence was honoured.
    assert len({len(text) for text in mine}) > 1


def test_is_greedy_exactly_for_the_models_own_continuation(runs):
    from dist_llm.eval.harness import DistLLM
    from dist_llm.model.generate import generate

    _, checkpoint, _, _ = runs
    lm = DistLLM(str(checkpoint), "cpu", batch_size=2)
    context = lm.tok_encode("To be, or not to be, that is the question:")
    greedy = generate(lm.model, context, 5)
    other = [*greedy[:-1], (greedy[-1] + 1) % lm.config.model.vocab_size]
    (mine, is_greedy), (theirs, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)]
    )
    assert is_greedy and not not_greedy and mine > theirs
    with torch.no_grad():
        logits = lm.model(torch.tensor([context + greedy]))[0, len(context) - 1 : -1]
    logprobs = torch.log_softmax(logits, -1)
    assert mine == pytest.approx(float(logprobs.gather(1, torch.tensor(greedy)[:, None]).sum()), rel=1e-6)


def test_the_eval_stage_runs_tasks(runs, capsys):
    tasks, checkpoint, _, _ = runs
    import lm_eval.api.registry

    from dist_llm.eval.harness import DistLLM

    assert lm_eval.api.registry.get_model("dist-llm") is DistLLM  # what `--model dist-llm` finds
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, tasks.parent / "datasets")
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--tasks",
                "shakespeare_mc",
                "--include-path",
                str(tasks),
                "--limit",
                "8",
            ]
        )
    printed = json.loads(capsys.readouterr().out)
    assert printed["shakespeare_mc"]["sample_len"] == 8
    assert not math.isnan(printed["shakespeare_mc"]["acc,none"])


def test_task_options_without_tasks_are_refused(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "--text", "t.txt", "--limit", "8"]) == 2
    assert "pass --tasks too" in capsys.readouterr().err


def test_prefix_and_end_are_the_tokenizer_configs_bos_and_eos(tmp_path, tokenizer_dir):
    """As hf takes them from transformers: an imported model's own (SmolLM2: <|im_start|>,
    <|im_end|>); <|endoftext|> where tokenizer_config.json names neither."""
    from dist_llm.eval.harness import DistLLM

    config = load_config(CONFIG)
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings.update(bos_token="<|im_start|>", eos_token={"content": "<|im_end|>"})  # AddedToken form too
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    lm = DistLLM(str(save_weights_only(tmp_path / "chat", model_state(config), config, tokenizer)), "cpu")
    ids = lm._tokenizer.token_to_id
    assert (lm.prefix_token_id, lm.eot_token_id) == (ids("<|im_start|>"), ids("<|im_end|>"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tokenizer / name).unlink(missing_ok=True)
    lm = DistLLM(str(save_weights_only(tmp_path / "plain", model_state(config), config, tokenizer)), "cpu")
    assert lm.prefix_token_id == lm.eot_token_id == ids("<|endoftext|>")
