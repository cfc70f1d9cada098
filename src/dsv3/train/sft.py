"""Supervised fine-tuning data: a conversation rendered with the chat template, learned on its
assistant turns only.

A chat record's `messages` are rendered with the template the model will be served with: the
`chat_template` of the tokenizer_config.json beside the tokenizer (as dsv3.infer.chat.ChatTokenizer
reads it), else DEFAULT_CHAT_TEMPLATE. Fine-tuning teaches the model to write the assistant's turns
given everything before them, so the only tokens it learns to predict are those of the turns: the
assistant's content and the end-of-turn text the template puts after it (<|eos|> in the default
template); not the `<|Assistant|>` marker that opens the turn, and no system or user text.

Finding the turns without knowing the template's syntax: for each assistant message i the template
renders
    prompt_i = render(messages[:i], add_generation_prompt=True)   where the model starts writing
    turn_i   = render(messages[:i + 1])                           the prompt and the assistant's turn
and the turn's text is turn_i[len(prompt_i):], provided prompt_i is a prefix of turn_i and turn_i a
prefix of the whole conversation: true of templates that render a conversation turn by turn, as
serving needs (a record the template renders otherwise is bad, with that reason). The text is cut at
the turns and each piece tokenized on its own, so every piece boundary is a token boundary: the
learned tokens are the tokens the model must generate after a prompt, and the first prompt is
tokenized as the server tokenizes it. An assistant message that opens a conversation has no prompt
(render needs at least one message) and is context only; a conversation with no other assistant
message has nothing to learn and is a bad record.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.infer.chat import ChatError, ChatTokenizer, check_messages, render, render_default
from dsv3.tokenizer import TokenizerInfo


def chat_problem(messages: Any) -> str | None:
    """Why `messages` cannot be learned from (malformed, or no assistant turn after a prompt), or None."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a list of objects with a role and a content"
    try:
        check_messages(messages)
    except ChatError as e:
        return str(e)
    if not any(m["role"] == "assistant" for m in messages[1:]):
        return "no assistant turn to learn (an assistant message after a user or system message)"
    return None


def chat_template_for(tokenizer_path: str | Path) -> str:
    """The chat template served with this tokenizer: its folder's tokenizer_config.json, or the default."""
    path = Path(tokenizer_path)
    folder = path if path.is_dir() else path.parent
    return ChatTokenizer.from_folder(folder, sys.maxsize, tokenizer_file=path).chat_template


def plain_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as text for training a tokenizer: the default layout with its role markers."""
    return render_default(messages, bos_token="", eos_token="", add_generation_prompt=False)


def turn_pieces(messages: list[dict[str, Any]], template: str, bos: str, eos: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into pieces (text, learned): the assistant turns are learned.
    ValueError when the template does not render the conversation turn by turn."""
    whole = render(template, messages, bos, eos, add_generation_prompt=False)
    pieces, done = [], 0
    for i in range(1, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], bos, eos, add_generation_prompt=True)
        turn = render(template, messages[: i + 1], bos, eos, add_generation_prompt=False)
        if not (turn.startswith(prompt) and whole.startswith(turn) and len(prompt) >= done):
            raise ValueError(
                f"the chat template does not render messages[{i}] turn by turn (the rendering of the "
                "messages before it is not where the whole conversation has them), so its turn cannot be found"
            )
        pieces += [(whole[done : len(prompt)], False), (whole[len(prompt) : len(turn)], True)]
        done = len(turn)
    pieces.append((whole[done:], False))
    if not any(text for text, learned in pieces if learned):
        raise ValueError("the chat template renders no text for the assistant turns")
    return [(text, learned) for text, learned in pieces if text]


def encode_chats(
    chats: list[list[dict[str, Any]]], tok: TokenizerInfo, template: str
) -> list[tuple[list[int], np.ndarray] | str]:
    """Each conversation's token ids and learned mask (uint8 [n], 1 on assistant-turn tokens), or
    why it is bad (the template failed on it or does not render it turn by turn)."""
    bos = "" if tok.bos_id is None else tok.tokenizer.id_to_token(tok.bos_id)
    eos = tok.tokenizer.id_to_token(tok.eos_id)
    cut: list[list[tuple[str, bool]] | str] = []
    for messages in chats:
        try:
            cut.append(turn_pieces(messages, template, bos, eos))
        except ValueError as e:
            cut.append(str(e))
        except Exception as e:  # a template may raise anything on a record (jinja errors, TypeError ...)
            cut.append(f"the chat template failed on this conversation: {e}")
    texts = [text for pieces in cut if not isinstance(pieces, str) for text, _ in pieces]
    encoded = iter(tok.tokenizer.encode_batch(texts, add_special_tokens=False))
    out: list[tuple[list[int], np.ndarray] | str] = []
    for pieces in cut:
        if isinstance(pieces, str):
            out.append(pieces)
            continue
        ids, learned = [], []
        for _, is_learned in pieces:
            piece = next(encoded).ids
            ids += piece
            learned.append(np.full(len(piece), is_learned, dtype=np.uint8))
        out.append((ids, np.concatenate(learned)))
    return out
