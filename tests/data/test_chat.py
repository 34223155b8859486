"""Chat data: conversations sharded with their template, trained only on assistant turns (checked
token by token against transformers' own assistant mask), one document per conversation, bad
records named by file and line or skipped and counted, templates that cannot be masked refused."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dist_llm.data.chat import ChatEncoder, ChatError
from dist_llm.data.documents import InputError, ReadOptions
from dist_llm.data.manifest import open_split
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.stream import IGNORE_INDEX, TokenLoader

from .test_shard import read_split, token_stream

CHATS = [
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "William Shakespeare."},
        {"role": "user", "content": "And when?"},
        {"role": "assistant", "content": "Around 1600, in London."},
    ],
    [
        {"role": "user", "content": "Name a comedy."},
        {"role": "assistant", "content": "As You Like It."},
    ],
    [
        {"role": "user", "content": "Quote Lear."},
        {"role": "assistant", "content": "Nothing will come of nothing: speak again."},
        {"role": "user", "content": "Thanks."},
    ],
]
# ChatML written independently of dist-llm, with the {% generation %} markers transformers needs
# for its assistant mask: content plus <|im_end|> is trained, the newline after it is not.
MARKED_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("chat")
    src = write_jsonl(folder / "chat.jsonl", [{"messages": m} for m in CHATS * 4])
    read = ReadOptions(messages_field="messages")
    opts = ShardOptions(seq_len=48, val_fraction=0.0, read=read)
    return shard_corpus([str(src)], tokenizer_dir, folder / "ds", opts), folder / "ds"


def test_tokens_and_mask_equal_transformers_token_by_token(chat_shards, tokenizer_dir):
    manifest, out = chat_shards
    assert manifest["has_loss_mask"] and manifest["splits"]["train"]["documents"] == 3  # duplicates dropped
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    eot = manifest["tokenizer"]["eot_id"]
    ids, mask = [], []
    for chat in CHATS:
        marked = hf.apply_chat_template(
            chat, chat_template=MARKED_CHATML, return_dict=True, return_assistant_tokens_mask=True
        )
        ids += [*marked["input_ids"], eot]
        mask += [*marked["assistant_masks"], 0]  # the end-of-text between conversations: not a turn
    samples = read_split(out, "train")
    stream = token_stream(samples)
    shard_mask = [*samples[0]["loss_mask"], *(int(m) for s in samples[1:] for m in s["loss_mask"][1:])]
    assert len(stream) > len(ids) / 2
    assert stream.tolist() == ids[: len(stream)]
    assert shard_mask == mask[: len(stream)]
    # The trained tokens are the assistants' words and their <|im_end|>, nothing else.
    trained = hf.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    replies = [m["content"] for chat in CHATS for m in chat if m["role"] == "assistant"]
    assert trained == "".join(f"{reply}<|im_end|>" for reply in replies)


def test_each_conversation_is_its_own_document(chat_shards):
    _, out = chat_shards
    batch = next(iter(TokenLoader([(open_split(str(out)), 1.0)], batch_size=4, seed=0)))
    inputs, docs, labels = batch["input_ids"], batch["document_ids"], batch["labels"]
    eot = 0
    # A new document starts exactly after each end-of-text, and every one starts a conversation.
    new_doc = docs[:, 1:] != docs[:, :-1]
    assert torch.equal(new_doc, inputs[:, :-1] == eot) and new_doc.any()
    assert (inputs[:, 1:][new_doc] == ChatEncoder(out).tokenizer.token_to_id("<|im_start|>")).all()
    assert torch.equal(labels == IGNORE_INDEX, ~batch["loss_mask"]) and batch["loss_mask"].any()


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, tokenizer_dir):
    good = {"messages": CHATS[1]}
    bad = [
        ({"text": "no messages"}, "record has no field 'messages'"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, r"messages\[0\] has no 'role'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\] has role 'tool'; the roles are"),
        (
            {"messages": [{"role": "user", "content": ["x"]}]},
            r"messages\[0\] \(user\) has content of type list",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "'messages' has no assistant message: nothing in it would be trained",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a<|im_end|>b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            r"message 0 \(user\) holds the special token '<\|im_end\|>' as text",
        ),
    ]
    read = ReadOptions(messages_field="messages")
    for i, (record, message) in enumerate(bad):
        src = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, record])
        with pytest.raises(InputError, match=f"{src}:2: {message}"):
            shard_corpus([str(src)], tokenizer_dir, tmp_path / "out", ShardOptions(seq_len=8, read=read))
    src = write_jsonl(tmp_path / "mixed.jsonl", [good] + [r for r, _ in bad] + [{"messages": CHATS[0]}])
    skip = ReadOptions(messages_field="messages", on_error="skip")
    opts = ShardOptions(seq_len=8, val_fraction=0.0, read=skip)
    manifest = shard_corpus([str(src)], tokenizer_dir, tmp_path / "out", opts)
    assert manifest["splits"]["train"]["documents"] == 2
    cleaning = manifest["cleaning"]
    assert (cleaning["lines_missing_field"], cleaning["lines_bad_messages"]) == (1, 5)
    assert cleaning["conversations_not_maskable"] == 1


def tokenizer_folder(tmp_path, tokenizer_dir, template=None):
    """The session tokenizer, with `template` (or no template) in its tokenizer_config.json."""
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_built_in_chatml_and_a_tokenizer_without_its_tokens(tmp_path, tokenizer_dir):
    plain = ChatEncoder(tokenizer_folder(tmp_path, tokenizer_dir))
    assert plain.source == "the built-in ChatML template"
    chat = [(m["role"], m["content"]) for m in CHATS[0]]
    assert plain.encode_chat(chat) == ChatEncoder(tokenizer_dir).encode_chat(chat)
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "bare").mkdir()
    bare.save(str(tmp_path / "bare" / "tokenizer.json"))
    with pytest.raises(
        InputError, match=r"no chat template and lacks <\|im_start\|> and <\|im_end\|>.*tokenizer train"
    ):
        ChatEncoder(tmp_path / "bare")
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[1]}])
    opts = ShardOptions(seq_len=8, read=ReadOptions(messages_field="messages"))
    with pytest.raises(InputError, match="lacks <"):  # before any worker starts
        shard_corpus([str(src)], tmp_path / "bare", tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()


def test_templates_whose_turns_cannot_be_found_are_refused(tmp_path, tokenizer_dir):
    # A template that rewrites earlier turns (marks the last one): no rendering is a prefix.
    rewrites = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + (' (last)' if loop.last else '') + '\\n' }}{% endfor %}"
    chat = [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Farewell")]
    with pytest.raises(ChatError, match="does not render conversations turn by turn"):
        ChatEncoder(tokenizer_folder(tmp_path / "a", tokenizer_dir, rewrites)).encode_chat(chat)
    # A template with nothing between the role and the content: BPE merges across the edge.
    glued = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% endif %}"
    )
    encoder = ChatEncoder(tokenizer_folder(tmp_path / "b", tokenizer_dir, glued))
    head = encoder.encode("<|im_start|>assistant")
    merging = [
        w
        for w in ("s", "nce", "ce", "ly", "ed")
        if encoder.encode(f"<|im_start|>assistant{w}")[: len(head)] != head
    ]
    assert merging, "no test word merges with 'assistant' in this tokenizer"
    with pytest.raises(ChatError, match="merges text across the start or end of an assistant turn"):
        encoder.encode_chat([("user", "Hi"), ("assistant", merging[0])])
