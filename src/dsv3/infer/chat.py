"""The chat template and the tokenizer the CLI and the server share.

A chat is turned into one token sequence by a Jinja template stored with the tokenizer, in
`tokenizer_config.json` under `chat_template`, as Hugging Face does. The default follows
DeepSeek-V3's layout, adapted to our tokenizer's special tokens (<|bos|>, <|eos|> from
dsv3.train.data):

    <|bos|>{system prompts, joined by blank lines}<|User|>{user}<|Assistant|>{assistant}<|eos|><|User|>...<|Assistant|>

The model answers after the final <|Assistant|> and ends its turn with <|eos|>, the engine's stop
token. Our small tokenizers have no tokens for the role markers, so they are plain text (a few
BPE pieces); they are also passed as stop strings so that a model that starts the next turn
stops there. Templates are rendered with jinja2 (a dependency of transformers) in a sandbox; without
jinja2 the default template is rendered by `render_default`, a transcription the tests hold
equal to the Jinja rendering.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages if m['role'] == 'system' %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|Assistant|>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}"
)


class ChatError(ValueError):
    """A malformed conversation; the message names the message index and field."""


def check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise ChatError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ChatError(f"messages[{i}].role={m.get('role')!r}: must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"messages[{i}].content must be a string")


def render_default(
    messages: list[dict[str, Any]], bos_token: str, eos_token: str, add_generation_prompt: bool
) -> str:
    """DEFAULT_CHAT_TEMPLATE in plain Python (used when jinja2 is not installed)."""
    out = [bos_token, "\n\n".join(m["content"] for m in messages if m["role"] == "system")]
    for m in messages:
        if m["role"] == "user":
            out.append(USER + m["content"])
        elif m["role"] == "assistant":
            out.append(ASSISTANT + m["content"] + eos_token)
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def render(template: str, messages: list[dict[str, Any]], bos_token: str, eos_token: str,
           add_generation_prompt: bool = True) -> str:  # fmt: skip
    """Render a chat template the way transformers' apply_chat_template does."""
    check_messages(messages)
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        if template != DEFAULT_CHAT_TEMPLATE:
            raise ChatError("this tokenizer's chat_template needs jinja2 (pip install jinja2)") from None
        return render_default(messages, bos_token, eos_token, add_generation_prompt)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )


@dataclass
class ChatTokenizer:
    """A tokenizers.Tokenizer with its bos/eos ids and chat template."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    stop: tuple[str, ...] = field(default=(USER,))  # stop strings of a chat turn

    @classmethod
    def from_folder(
        cls, folder: str | Path, vocab_size: int, tokenizer_file: str | Path | None = None
    ) -> ChatTokenizer:
        """Load tokenizer.json (or `tokenizer_file`) and the chat template of tokenizer_config.json."""
        from dsv3.tokenizer import load_tokenizer

        folder = Path(folder)
        info = load_tokenizer(tokenizer_file or folder / "tokenizer.json", vocab_size)
        template = DEFAULT_CHAT_TEMPLATE
        config = folder / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text()).get("chat_template") or DEFAULT_CHAT_TEMPLATE
        return cls(info.tokenizer, info.bos_id, info.eos_id, template)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.tokenizer.id_to_token(self.eos_id)

    def encode(self, text: str) -> list[int]:
        """A completion prompt: <|bos|> + text, as in training."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The conversation rendered with the template, ending in the assistant's turn."""
        text = render(
            self.chat_template, messages, self.bos_token, self.eos_token, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def write_tokenizer_config(folder: str | Path) -> None:
    """Write tokenizer_config.json beside tokenizer.json with the default chat template (the file
    transformers' AutoTokenizer reads: its apply_chat_template then renders what we render)."""
    from dsv3.tokenizer import load_tokenizer

    folder = Path(folder)
    info = load_tokenizer(folder / "tokenizer.json", max_vocab=sys.maxsize)
    tok = info.tokenizer
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if info.bos_id is None else tok.id_to_token(info.bos_id),
        "eos_token": tok.id_to_token(info.eos_id),
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class TextDeltas:
    """Stream a generation's text in pieces that are never taken back. The engine's text so far
    may end in an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) or
    in the first characters of a stop string (cut from the final text if the rest follows);
    both are held back until the next update settles them."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop, self.sent = stop, 0

    def update(self, text: str | None, finished: bool) -> str:
        """The new piece of `text` (the engine's decoded output so far) that is safe to show."""
        text = text or ""
        end = len(text)
        if not finished:
            end = len(text.rstrip("\ufffd"))
            end -= max(  # the longest tail of text[:end] that begins a stop string
                (
                    k
                    for s in self.stop
                    for k in range(1, min(len(s) - 1, end) + 1)
                    if text[end - k : end] == s[:k]
                ),
                default=0,
            )
        delta = text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta
