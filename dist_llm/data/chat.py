"""Conversations (`messages`: [{role, content}]) as tokens, with a mask of what is trained.

The template is the tokenizer's own: `chat_template` in tokenizer_config.json, or
`chat_template.jinja` beside it (where transformers 5 saves it). A tokenizer without one gets the
built-in ChatML (tokenizer.CHATML_TEMPLATE), which needs its `<|im_start|>`/`<|im_end|>` tokens.
Templates are rendered with jinja2 the way transformers renders them (sandboxed, trim_blocks,
lstrip_blocks, the same globals and special-token variables), so that an exported model's
`apply_chat_template` gives the tokens trained on.

What is trained is each assistant turn's content and its end-of-turn token. Templates rarely mark
it (`{% generation %}`), so it is found by rendering: the conversation up to each assistant turn
with the generation prompt (where the turn starts) and with the turn (where it ends). Each of those
renderings must be a prefix of the whole conversation's, as text and as tokens; otherwise the
record is refused with the reason, since a template that rewrites earlier turns, or a tokenizer
that merges across a turn's edge, would train on tokens the model never sees when it generates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from dist_llm.data.tokenizer import CHATML_TEMPLATE, EOT, IM_END, IM_START, tokenizer_path
from dist_llm.errors import InputError
from dist_llm.files import write_json_atomic

Messages = Sequence[tuple[str, str]]  # (role, content)
# The special-token variables transformers hands every template ({{ bos_token }} ...).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatError(ValueError):
    """A conversation that cannot be rendered and masked; the caller names the record."""


def read_chat_template(folder: Path) -> str | None:
    """The chat template a Hugging Face tokenizer folder holds, or None."""
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():  # transformers 4.4x
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def write_chat_template(folder: Path, template: str) -> None:
    """Put `template` into folder/tokenizer_config.json: where dist-llm keeps it and transformers
    4.x and 5.x both read it."""
    config = _tokenizer_config(folder)
    if config.get("chat_template") != template:
        write_json_atomic(folder / "tokenizer_config.json", {**config, "chat_template": template})


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ChatEncoder:
    """A tokenizer with its chat template: renders, tokenizes and masks conversations."""

    def __init__(self, location: str | Path):
        path = tokenizer_path(location)
        # Not load_tokenizer: the template's special tokens in the rendered text must be parsed.
        self.tokenizer = Tokenizer.from_file(str(path))
        template = read_chat_template(path.parent)
        self.source = f"the chat template of {path.parent}" if template else "the built-in ChatML template"
        if template is None:
            self._check_chatml(path)
        self.template = template or CHATML_TEMPLATE
        self._compiled = _compile(self.template)
        config = _tokenizer_config(path.parent)
        self.variables = {k: _token_text(config[k]) for k in TEMPLATE_TOKENS if config.get(k)}
        added = self.tokenizer.get_added_tokens_decoder().values()
        self.specials = sorted({t.content for t in added if t.special}, key=len, reverse=True)
        ends = [IM_END, self.variables.get("eos_token")]
        self.end_ids = {self.tokenizer.token_to_id(t) for t in ends if t and t in self.template}
        self.end_ids.discard(None)

    def _check_chatml(self, path: Path) -> None:
        missing = [t for t in (IM_START, IM_END) if self.tokenizer.token_to_id(t) is None]
        if missing:
            raise InputError(
                f"{path} has no chat template and lacks {' and '.join(missing)}, the special tokens of "
                "the built-in ChatML template: train the tokenizer again with `dist-llm tokenizer train` "
                "(which adds them), or add a `chat_template` written with this tokenizer's own special "
                "tokens to tokenizer_config.json beside it"
            )

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            return self._compiled.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **self.variables
            )
        except Exception as exc:  # the template's raise_exception, or any error inside it
            raise ChatError(f"{self.source} failed on this conversation: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # as apply_chat_template

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]:
        """(token ids, mask): 1 on each assistant turn's content and end-of-turn token."""
        self._check_text(messages)
        full = self.render(messages)
        ids = self.encode(full)
        mask = [0] * len(ids)
        for k, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            start = self._prefix_tokens(full, ids, self.render(messages[:k], add_generation_prompt=True))
            end = self._prefix_tokens(full, ids, self.render(messages[: k + 1]))
            ends = [i for i in range(start, end) if ids[i] in self.end_ids]
            end = ends[-1] + 1 if ends else end  # not the newline after <|im_end|>: never generated
            mask[start:end] = [1] * (end - start)
        return ids, mask

    def _prefix_tokens(self, full: str, ids: list[int], prefix: str) -> int:
        """How many of `ids` the rendered `prefix` is, checking it renders and tokenizes as a prefix."""
        if not full.startswith(prefix):
            raise ChatError(
                f"{self.source} does not render conversations turn by turn (the conversation up to "
                "an assistant turn is not the start of the whole one: it rewrites earlier turns), "
                "so the assistant's tokens cannot be found; use a template that appends each turn"
            )
        head = self.encode(prefix)
        if ids[: len(head)] != head:
            raise ChatError(
                f"the tokenizer merges text across the start or end of an assistant turn "
                f"(near {full[max(0, len(prefix) - 20) : len(prefix) + 20]!r}), so the tokens the model "
                "is trained on would differ from those it is prompted with; the template should put a "
                "special token or a line break at each turn's edges"
            )
        return len(head)

    def _check_text(self, messages: Messages) -> None:
        # A special token written as text would be parsed as the control token: a forged turn.
        for i, (role, content) in enumerate(messages):
            found = next((t for t in self.specials if t in content), None)
            if found:
                raise ChatError(
                    f"message {i} ({role}) holds the special token {found!r} as text, which would be "
                    "read as the control token and could forge a turn; remove it from the data"
                )

    def prompt_ids(self, prompt: str, system: str = "") -> list[int]:
        """A user message (after an optional system one) and the assistant turn's opening."""
        messages = [("system", system)] if system else []
        messages.append(("user", prompt))
        self._check_text(messages)
        return self.encode(self.render(messages, add_generation_prompt=True))

    def stop_ids(self) -> set[int]:
        """The tokens that end an assistant turn (and end-of-text, which ends anything)."""
        eot = self.tokenizer.token_to_id(EOT)
        return self.end_ids | ({eot} if eot is not None else set())


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _compile(template: str):
    """The template compiled as transformers' `_compile_jinja_template` does."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # {% generation %} marks assistant text for transformers' mask; here it only renders.
        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"the chat template does not parse: {exc}") from None
