"""The tokenizer: a Hugging Face `tokenizers` byte-level BPE with the special tokens dsv3 needs.

Shared by training (which trains one on its corpus, or takes the user's `tokenizer.json`), the
inference engine, the server and checkpoint conversion. Our own tokenizers have <|bos|> = 0 and
<|eos|> = 1 (the ids ModelConfig expects); a foreign `tokenizer.json` is accepted when it has an
end-of-text token under one of the usual names (EOS_ALIASES), and a begin token if it has one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.errors import DataError

BOS, EOS = "<|bos|>", "<|eos|>"
EOS_ALIASES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
BOS_ALIASES = (BOS, "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>")


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer with the ids the packer and the sampler need."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE with <|bos|> = 0 and <|eos|> = 1 on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer)
    return tok


def load_tokenizer(path: str | Path, max_vocab: int) -> TokenizerInfo:
    """Load a `tokenizer.json` (or the one in a folder); its vocabulary must fit the model's embedding."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"tokenizer file {path} could not be read: {e}") from e
    if tok.get_vocab_size() > max_vocab:
        raise DataError(
            f"tokenizer {path} has {tok.get_vocab_size()} tokens, more than the model's vocab_size={max_vocab}"
        )
    eos = _first_token_id(tok, EOS_ALIASES)
    if eos is None:
        raise DataError(f"tokenizer {path} has no end-of-text token (one of {EOS_ALIASES})")
    return TokenizerInfo(tok, _first_token_id(tok, BOS_ALIASES), eos)


def _first_token_id(tok: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None
