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

The text of a generation is built here too, in time linear in its length: IncrementalText
(incremental detokenization, used by the engine), StopStrings (KMP automata for the stop
strings) and TextDeltas (the pieces of a growing text that are safe to stream).
"""

from __future__ import annotations

import functools
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


def render(
    template: str,
    messages: list[dict[str, Any]],
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
) -> str:
    """Render a chat template the way transformers' apply_chat_template does."""
    check_messages(messages)
    try:
        compiled = _compiled(template)
    except ImportError:
        if template != DEFAULT_CHAT_TEMPLATE:
            raise ChatError("this tokenizer's chat_template needs jinja2 (pip install jinja2)") from None
        return render_default(messages, bos_token, eos_token, add_generation_prompt)
    return compiled.render(
        messages=messages,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (compiling costs ~200x a render; training data renders thousands)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


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
        return ([self.bos_id] if self.bos_id is not None else []) + self._ids(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The conversation rendered with the template, ending in the assistant's turn."""
        text = render(
            self.chat_template, messages, self.bos_token, self.eos_token, add_generation_prompt=True
        )
        return self._ids(text)

    def _ids(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized
        # in a worker thread then leaves the server's event loop free
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

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


class StopStrings:
    """Finds stop strings in a text that grows at its end, in time linear in the text.

    Each stop string s has a Knuth-Morris-Pratt automaton whose state, after reading the text, is
    the length of the longest prefix of s that ends the text; one more character moves it in
    amortized O(1) (on a mismatch the failure function says how far to fall back). A match is
    the state reaching len(s), and the largest state is the tail of the text that may still
    become a stop string, which a stream must hold back (`held`). Reading a piece costs
    O(len(piece)) per stop string, whatever their lengths, where searching the whole text again
    after every token would cost O(text x stop) per token."""

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(stops)
        self.failure = [_failure_function(s) for s in self.stops]
        self.states = [0] * len(self.stops)
        self.length = 0  # characters read so far

    def feed(self, piece: str) -> int | None:
        """Read `piece`; returns where (in the text read so far) the earliest-starting stop string
        completed within `piece` starts, or None."""
        found = None
        for i, (stop, failure) in enumerate(zip(self.stops, self.failure)):
            q = self.states[i]
            for j, c in enumerate(piece):
                while q and stop[q] != c:
                    q = failure[q - 1]
                if stop[q] == c:
                    q += 1
                if q == len(stop):
                    start = self.length + j + 1 - len(stop)
                    found = start if found is None else min(found, start)
                    q = failure[q - 1]
            self.states[i] = q
        self.length += len(piece)
        return found

    @property
    def held(self) -> int:
        """The length of the longest tail of the text that is a proper prefix of a stop string."""
        return max(self.states, default=0)


def _failure_function(s: str) -> list[int]:
    """KMP's failure function: f[i] = the length of the longest proper prefix of s[: i + 1] that
    is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class IncrementalText:
    """A generation's text, built as its tokens arrive in time linear in the text (the
    incremental detokenization of vLLM and of transformers' TextStreamer), with its stop strings.

    Decoding the whole output again after every token would cost O(n) per token. Instead each
    new token is decoded together with the tokens since the last point where the text was
    settled, plus the window before them as context (so that decoders that treat a leading space
    specially, like Metaspace, see the same neighbours): decode(ids[prefix:]) minus the
    characters of decode(ids[prefix:read]) is the text of ids[read:]. While that text ends in
    U+FFFD (an incomplete UTF-8 character: byte-level BPE splits characters across tokens) only
    what precedes it is settled; once it no longer does, the window moves on. For byte-level
    BPE the settled text is then exactly decode(ids) without its incomplete tail, and `finish`
    makes it exactly decode(ids). A run of more than MAX_PENDING tokens that all end in U+FFFD
    (no UTF-8 character spans more than 4 bytes) is settled as it is, so that a model emitting
    invalid bytes forever still costs linear time.

    `add` returns where a stop string starts when the new token completed one (StopStrings over
    the settled text); `visible` is the text without the tail that may still become one."""

    MAX_PENDING = 16

    def __init__(self, decode, stop: tuple[str, ...] = ()) -> None:
        self.decode, self.stops = decode, StopStrings(stop)
        self.text = ""  # settled text
        self.prefix = self.read = 0  # ids[:read] are settled; ids[prefix:read] is the context window
        self.prefix_chars = 0  # len(decode(ids[prefix:read]))
        self.shown = 0  # characters of the text of ids[read:] already settled
        self.final = False

    def _pending(self, ids: list[int]) -> str:
        """The text of ids[read:], decoded in its context window."""
        return self.decode(ids[self.prefix :])[self.prefix_chars :]

    def add(self, ids: list[int]) -> int | None:
        """ids: the output so far, its last token new. Returns where in `text` a stop string
        starts if this token completed one, else None."""
        pending = self._pending(ids)
        if pending.endswith("\ufffd") and len(ids) - self.read < self.MAX_PENDING:
            piece = pending.rstrip("\ufffd")[self.shown :]
            self.shown += len(piece)
        else:
            piece = pending[self.shown :]
            self.prefix, self.read, self.shown = self.read, len(ids), 0
            self.prefix_chars = len(self.decode(ids[self.prefix : self.read]))
        self.text += piece
        return self.stops.feed(piece)

    def cut(self, at: int) -> None:
        """The generation stopped at a stop string starting at text[at]: the text ends before it."""
        self.text, self.final = self.text[:at], True

    def finish(self, ids: list[int]) -> None:
        """The generation ended (eos, stop token, length): its text is all of decode(ids)."""
        if not self.final:
            self.text += self._pending(ids)[self.shown :]
            self.final = True

    @property
    def visible(self) -> str:
        """The text that can be shown while generating: it only ever grows."""
        return self.text[: len(self.text) - self.stops.held]


class TextDeltas:
    """Stream a generation's text in pieces that are never taken back. The engine's text so far
    may end in an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) or
    in the first characters of a stop string (cut from the final text if the rest follows);
    both are held back until the next update settles them. Each update reads only the new
    characters (StopStrings), so a stream costs time linear in its text."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stops, self.sent = StopStrings(stop), 0

    def update(self, text: str | None, finished: bool) -> str:
        """The new piece of `text` (the engine's decoded output so far) that is safe to show."""
        text = text or ""
        end = len(text)
        if not finished:
            while end > self.stops.length and text[end - 1] == "\ufffd":
                end -= 1
            if end > self.stops.length:
                self.stops.feed(text[self.stops.length : end])
            end = min(end, self.stops.length - self.stops.held)
        delta = text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta
