"""Generation never gives less than asked without saying so: prompts that do not fit are refused
or visibly truncated, new tokens beyond the context are capped with a note, an empty prompt
starts a new document (sampling arguments out of range: tests/test_fault_matrix.py)."""

import pytest

from dist_llm.checkpoint import load_model
from dist_llm.cli import main
from dist_llm.model.generate import fit_context, generate

from ..eval.test_perplexity import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", tokenizer_dir, seed=3)[0]


def test_fit_context_refuses_truncates_and_caps_with_notes():
    assert fit_context([1, 2, 3], 4, 8, truncate_prompt=False) == ([1, 2, 3], 4, [])
    with pytest.raises(ValueError, match=r"the prompt is 8 tokens .* is 8: .*--truncate-prompt .* last 7"):
        fit_context(list(range(8)), 4, 8, truncate_prompt=False)
    ids, new, notes = fit_context(list(range(10)), 4, 8, truncate_prompt=True)
    assert ids == list(range(3, 10)) and new == 1
    assert notes == [
        "prompt truncated: kept its last 7 of 10 tokens",
        "--max-new-tokens 4 capped to 1: the context holds 8 tokens (model.max_seq_len) and the prompt uses 7",
    ]


def test_generate_refuses_more_than_the_context(checkpoint):
    model, config, _ = load_model(checkpoint)
    limit = config.model.max_seq_len
    with pytest.raises(ValueError, match="exceed the context"):
        generate(model, [1] * (limit - 2), 3)
    assert len(generate(model, [1] * (limit - 2), 2)) == 2


def test_cli_reports_truncation_and_capping(checkpoint, capsys):
    _, config, tokenizer = load_model(checkpoint)
    limit = config.model.max_seq_len
    long = " ".join(["once more unto the breach"] * limit)
    n = len(tokenizer.encode(long).ids)
    base = ["generate", "--checkpoint", str(checkpoint), "--temperature", "0"]
    assert main([*base, "--prompt", long, "--max-new-tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert f"error: the prompt is {n} tokens" in err and "--truncate-prompt" in err
    assert main([*base, "--prompt", long, "--max-new-tokens", "10", "--truncate-prompt"]) == 0
    captured = capsys.readouterr()
    assert f"prompt truncated: kept its last {limit - 1} of {n} tokens" in captured.err
    assert "--max-new-tokens 10 capped to 1" in captured.err
    assert len(captured.out) < len(long)  # only the kept end of the prompt is echoed
    assert main([*base, "--prompt", "To be", "--max-new-tokens", "100000"]) == 0
    assert (
        f"--max-new-tokens 100000 capped to {limit - len(tokenizer.encode('To be').ids)}"
        in capsys.readouterr().err
    )


def test_cli_starts_a_new_document_from_an_empty_prompt(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "", "--max-new-tokens", "5"]) == 0
    assert "empty prompt: sampling a new document after <|endoftext|>" in capsys.readouterr().err


def test_generation_stops_at_the_first_stop_token(checkpoint):
    model, _, _ = load_model(checkpoint)
    free = generate(model, [5, 6, 7], 8)
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    assert generate(model, [5, 6, 7], 8, stop_ids={stop, -1}) == free[: free.index(stop) + 1]


def test_cli_chat_prompts_with_the_template_and_prints_only_the_reply(checkpoint, capsys):
    from transformers import AutoTokenizer

    from dist_llm.data.chat import ChatEncoder

    chat = ChatEncoder(checkpoint)
    hf = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat.prompt_ids("Who are you?", system="Be brief.") == expected
    assert chat.stop_ids() == {
        hf.convert_tokens_to_ids("<|im_end|>"),
        hf.convert_tokens_to_ids("<|endoftext|>"),
    }
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "Who are you?", "--max-new-tokens", "4"]
    assert main([*base, "--chat", "--system", "Be brief.", "--temperature", "0"]) == 0
    model, _, tokenizer = load_model(checkpoint)
    reply = tokenizer.decode(generate(model, expected, 4, stop_ids=chat.stop_ids()))
    assert capsys.readouterr().out == reply + "\n"
    assert main([*base, "--system", "Be brief."]) == 2
    assert "--system is a chat message: pass --chat too" in capsys.readouterr().err
