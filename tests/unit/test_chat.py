"""Chat template (against transformers' apply_chat_template and the built-in renderer) and the
text streamer that never takes back what it showed."""

import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.infer.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatError,
    ChatTokenizer,
    TextDeltas,
    render,
    render_default,
    write_tokenizer_config,
)

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ],
    [
        {"role": "system", "content": "A"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": "ünï ✓\n"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_file) -> Path:
    path = tmp_path_factory.mktemp("tok")
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    write_tokenizer_config(path)
    return path


def test_default_template_renders_the_deepseek_layout():
    text = render(DEFAULT_CHAT_TEMPLATE, CONVERSATIONS[1], "<|bos|>", "<|eos|>")
    assert text == "<|bos|>Be brief.<|User|>hi<|Assistant|>hello<|eos|><|User|>more<|Assistant|>"
    assert render(DEFAULT_CHAT_TEMPLATE, CONVERSATIONS[2], "<s>", "</s>", add_generation_prompt=False) == (
        "<s>A\n\nB<|User|>ünï ✓\n"
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_renderer_equals_jinja(messages, add_generation_prompt):
    args = (messages, "<|bos|>", "<|eos|>", add_generation_prompt)
    assert render_default(*args) == render(DEFAULT_CHAT_TEMPLATE, *args)


def test_without_jinja2_the_default_template_still_renders(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 fails
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    assert render(DEFAULT_CHAT_TEMPLATE, CONVERSATIONS[1], "<|bos|>", "<|eos|>") == render_default(
        CONVERSATIONS[1], "<|bos|>", "<|eos|>", True
    )
    with pytest.raises(ChatError, match="needs jinja2"):
        render("{{ messages }}", CONVERSATIONS[0], "", "")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_transformers_renders_the_stored_template_the_same(folder, messages):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    ours = ChatTokenizer.from_folder(folder, 8192)
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render(ours.chat_template, messages, ours.bos_token, ours.eos_token)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == ours.encode_chat(messages)


def test_special_tokens_become_their_ids(folder):
    tok = ChatTokenizer.from_folder(folder, 8192)
    ids = tok.encode_chat(CONVERSATIONS[1])
    assert ids[0] == tok.bos_id == 0 and ids.count(tok.eos_id) == 1  # the finished assistant turn
    assert tok.encode("x")[0] == tok.bos_id and tok.decode(tok.encode("a b")) == "a b"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "at least one"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\].role='bot'"),
        ([{"role": "user", "content": None}], r"messages\[0\].content must be a string"),
    ],
)
def test_bad_messages_are_clear_errors(messages, message):
    with pytest.raises(ChatError, match=message):
        render(DEFAULT_CHAT_TEMPLATE, messages, "", "")


def test_deltas_hold_back_incomplete_utf8(folder):
    tok = ChatTokenizer.from_folder(folder, 8192)
    text = "naïve ✓ café — 漢字 done"
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    deltas, pieces = TextDeltas(), []
    for k in range(1, len(ids) + 1):
        pieces.append(deltas.update(tok.decode(ids[:k]), finished=k == len(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # the case arose


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_deltas_never_show_what_a_stop_string_removes(text, stops, cuts):
    """Emulate the engine: the text grows in chunks; when a stop string appears the final text is
    cut before its first occurrence. What was streamed must be exactly the final text."""
    ends = sorted({min(c, len(text)) for c in cuts} | {len(text)})
    deltas, shown, final = TextDeltas(tuple(stops)), "", None
    for end in ends:
        so_far = text[:end]
        hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if hits:
            final = so_far[: min(hits)]
            shown += deltas.update(final, finished=True)
            break
        done = end == len(text)
        shown += deltas.update(so_far, finished=done)
        assert final is None
        if done:
            final = so_far
    assert shown == final
