"""Supervised fine-tuning data (dsv3.train.sft): chats rendered with the chat template, learned on
the assistant turns only, packed without crossing conversations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.infer.chat import DEFAULT_CHAT_TEMPLATE, ChatTokenizer
from dsv3.model.loss import IGNORE_INDEX
from dsv3.model.transformer import Transformer
from dsv3.tokenizer import load_tokenizer
from dsv3.train.data import Corpus, build_token_cache
from dsv3.train.packing import Loader, PackedTokens
from dsv3.train.sft import chat_problem, chat_template_for, encode_chats, turn_pieces
from fixtures import MICRO

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return load_tokenizer(tokenizer_file, max_vocab=4096)


def decode(tok, ids) -> str:
    return tok.tokenizer.decode(list(ids), skip_special_tokens=False)


def test_the_default_rendering_is_cut_at_the_assistant_turns():
    assert turn_pieces(CHAT, DEFAULT_CHAT_TEMPLATE, "<|bos|>", "<|eos|>") == [
        ("<|bos|>Be brief.<|User|>hi<|Assistant|>", False),
        ("hello!<|eos|>", True),
        ("<|User|>2+2?<|Assistant|>", False),
        ("4<|eos|>", True),
    ]


def test_learned_tokens_are_the_assistant_turns_and_the_prompt_is_the_servers(tok):
    [(ids, learned)] = encode_chats([CHAT], tok, DEFAULT_CHAT_TEMPLATE)
    assert len(ids) == len(learned) and learned.dtype == np.uint8
    ids = np.array(ids)
    assert decode(tok, ids[learned == 1]) == "hello!<|eos|>4<|eos|>"
    assert (
        decode(tok, ids[learned == 0]) == "<|bos|>Be brief.<|User|>hi<|Assistant|><|User|>2+2?<|Assistant|>"
    )
    # the tokens before the first turn are what the server feeds the model for that prompt
    served = ChatTokenizer(tok.tokenizer, tok.bos_id, tok.eos_id).encode_chat(CHAT[:2])
    first = int(np.argmax(learned))
    assert ids[:first].tolist() == served


def test_the_template_beside_a_checkpoints_tokenizer_is_used(tmp_path, tokenizer_file, tok):
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat_template_for(tmp_path / "tokenizer.json") == chat_template_for(tmp_path) == CHATML
    assert chat_template_for(tokenizer_file) == DEFAULT_CHAT_TEMPLATE  # a tokenizer alone: the default
    [(ids, learned)] = encode_chats([CHAT[1:3]], tok, CHATML)
    ids = np.array(ids)
    assert decode(tok, ids[learned == 1]) == "hello!<|im_end|>\n"
    assert decode(tok, ids[learned == 0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_conversation_the_template_does_not_render_turn_by_turn_is_bad(tok):
    newest_first = "{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    [problem] = encode_chats([CHAT[1:3]], tok, newest_first)
    assert problem.startswith("the chat template does not render messages[1] turn by turn")
    [problem] = encode_chats([CHAT[1:3]], tok, "{{ messages[5]['content'] }}")
    assert problem.startswith("the chat template failed on this conversation")


def test_malformed_chats_and_chats_with_nothing_to_learn_are_named():
    assert chat_problem(CHAT) is None
    assert chat_problem([{"role": "user", "content": "x"}]) == (
        "no assistant turn to learn (an assistant message after a user or system message)"
    )
    assert chat_problem([{"role": "assistant", "content": "greeting"}]).startswith("no assistant turn")
    assert chat_problem([{"role": "user", "content": None}]) == "messages[0].content must be a string"
    assert chat_problem([]) == "messages must hold at least one message"
    assert chat_problem(["hi"]).startswith("'messages' must be a list of objects")


def test_an_assistant_message_that_opens_the_conversation_is_context(tok):
    chat = [{"role": "assistant", "content": "Welcome."}, *CHAT[1:3]]
    [(ids, learned)] = encode_chats([chat], tok, DEFAULT_CHAT_TEMPLATE)
    assert decode(tok, np.array(ids)[learned == 1]) == "hello!<|eos|>"


# ------------------------------------------------------------------------------- packed chat data
# Assistant text uses only the letters x, y, z; everything else only digits, so a target token's
# text says which side of the conversation it comes from.
def conversation(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{i} 12 345"},
        {"role": "assistant", "content": "xyz " * (1 + i % 3)},
        {"role": "user", "content": "6789 " * (1 + i % 2)},
        {"role": "assistant", "content": "zyx"},
    ]


@pytest.fixture(scope="module")
def chat_split(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("sft")
    path = root / "chats.jsonl"
    rows = [{"text": "0123 4567 text before the chats"}] + [{"messages": conversation(i)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = build_token_cache(Corpus([str(path)]), tok, 0.1, root / "cache")
    return cache, cache.split(seq_len=32)


def test_chat_caches_store_the_learned_mask_text_fully_learned(chat_split, tok):
    cache, split = chat_split
    assert cache.meta["chats"] and split.train.learned is not None and split.val.learned is not None
    first_doc = slice(0, int(split.train.starts[1]))  # the text record: all its tokens learned
    assert split.train.learned[first_doc].all()
    assert not split.train.learned[int(split.train.starts[1]) :].all()


def test_only_assistant_tokens_are_targets_and_conversations_stay_apart(chat_split, tok):
    _, split = chat_split
    data = PackedTokens(split.train, seq_len=32, eos_id=tok.eos_id)  # chats: documents kept apart
    batch = data.batch(np.arange(len(data)))
    assert batch.segments is not None
    windows = data.window_starts(np.arange(len(data)))
    in_chats = torch.from_numpy(
        windows[:, None] + np.arange(1, 33) >= split.train.starts[1]
    )  # after the text
    targets = batch.labels[(batch.labels != IGNORE_INDEX) & in_chats].tolist()
    learned_text = "".join(decode(tok, [t]) for t in targets)
    assert set(learned_text.replace("<|eos|>", "")) == set("xyz ") and "<|eos|>" in learned_text
    for row, start in enumerate(windows):  # the reference: learned next token in the same document
        target = np.arange(start + 1, start + 33)
        doc = np.searchsorted(split.train.starts, np.arange(start, start + 33), side="right")
        expected = (split.train.learned[target] == 1) & (doc[1:] == doc[:-1])
        assert ((batch.labels[row] != IGNORE_INDEX).numpy() == expected).all()
        assert (batch.segments[row].numpy() == doc[:-1] - doc[0]).all()


def test_a_token_outside_an_assistant_turn_never_gets_a_gradient(chat_split, tok):
    """The loss reads the last hidden state h[t] only through the logits at t (MTP off), so dL/dh[t] is
    exactly zero where t's target is not learned, and not zero where it is."""
    _, split = chat_split
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **{**MICRO, "vocab_size": 4096, "num_nextn_predict_layers": 0})
    model = Transformer(cfg)
    batch = Loader(
        PackedTokens(split.train, seq_len=32, eos_id=tok.eos_id), batch_size=4, seed=0
    ).next_batch()
    out = model(batch.input_ids, labels=batch.labels, segments=batch.segments)
    out.hidden.retain_grad()
    out.loss.backward()
    grad = out.hidden.grad.norm(dim=-1)  # [B, T]
    ignored = batch.labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] > 0).all()


def test_a_chat_mixture_with_text_keeps_both_kinds_in_one_cache(tmp_path, tok):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(30)))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"{i} 0123 plain text"}) + "\n" for i in range(60)))
    cache = build_token_cache(Corpus([f"{chats}:0.5", f"{text}:0.5"]), tok, 0.1, tmp_path / "cache")
    split = cache.split(seq_len=16)
    text_part = split.train.parts[1]
    assert split.train.learned[text_part.start : text_part.end].all()
    batch = Loader(PackedTokens(split.train, 16, tok.eos_id), batch_size=8, seed=0).next_batch()
    assert batch.segments is not None and len(batch) == 8


def test_chats_render_from_the_template_given_and_key_the_cache_by_it(tmp_path, tok):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(20)))
    corpus = Corpus([str(path)])
    default = build_token_cache(corpus, tok, 0.1, tmp_path / "cache")
    chatml = build_token_cache(corpus, tok, 0.1, tmp_path / "cache", chat_template=CHATML)
    assert default.folder != chatml.folder
    assert "<|im_start|>user" in decode(tok, chatml.tokens("train")[:20])
    assert "<|User|>" in decode(tok, default.tokens("train")[:20])


def test_tokenizers_are_trained_on_chats_as_plain_text_with_role_markers(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    assert list(Corpus([str(path)])) == ["Be brief.<|User|>hi<|Assistant|>hello!<|User|>2+2?<|Assistant|>4"]


def test_the_first_prompt_matches_the_server_for_a_foreign_template(tok):
    served = ChatTokenizer(tok.tokenizer, tok.bos_id, tok.eos_id, CHATML).encode_chat(CHAT[1:2])
    [(ids, learned)] = encode_chats([CHAT[1:3]], tok, CHATML)
    assert ids[: int(np.argmax(learned))] == served
