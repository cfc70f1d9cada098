"""The text path of the engine and the server, held to plain references: stop-string matching
(KMP automata) equals searching the whole text with str.find, incremental detokenization equals
decoding the whole output, and both do work linear in the text (counted, not timed), where the
code they replace did quadratic work."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.infer.chat import ChatTokenizer, IncrementalText, StopStrings, TextDeltas

ALPHABET = "ab\n"


def earliest_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """The reference: where the first stop string to occur in `text` starts."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_reference(text: str, stops: tuple[str, ...]) -> int:
    """The reference: the longest tail of text that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_strings_find_what_str_find_finds(text, stops, cuts):
    """Fed in pieces, the automata report the first stop string at the piece where it completes,
    at the start str.find gives, and hold back exactly the reference's tail until then."""
    stops = tuple(stops)
    matcher, start = StopStrings(stops), 0
    for end in sorted({min(c, len(text)) for c in cuts} | {len(text)}):
        found = matcher.feed(text[start:end])
        start = end
        if found is not None:
            assert found == earliest_stop(text[:end], stops)
            return
        assert earliest_stop(text[:end], stops) is None
        assert matcher.held == held_reference(text[:end], stops)


class CountingStr(str):
    """A stop string that counts how often its characters are read."""

    reads = 0

    def __getitem__(self, i):
        CountingStr.reads += 1
        return str.__getitem__(self, i)


def test_stop_matching_reads_each_character_a_bounded_number_of_times():
    """A 1024-character stop string against 20,000 characters of text: the automaton reads the
    stop string O(text) times (the old hold-back search read O(text x stop^2) characters)."""
    stop = CountingStr("x" * 1023 + "y")
    text = "x" * 20_000
    matcher = StopStrings((stop,))
    CountingStr.reads = 0
    for i in range(0, len(text), 7):  # token-sized pieces
        assert matcher.feed(text[i : i + 7]) is None
    assert matcher.held == 1023
    assert CountingStr.reads <= 4 * len(text), CountingStr.reads


def test_incremental_text_equals_decoding_everything(tokenizer_file):
    """Random token ids (many cut UTF-8 characters in two) through IncrementalText one by one:
    the settled text always begins the full decode, never ends in U+FFFD, and `finish` makes it
    the full decode."""
    tok = ChatTokenizer.from_folder(tokenizer_file.parent, 2048, tokenizer_file)
    text = "naïve ✓ café — 漢字 done; def f(x): return x ** 2  # 🙂\n" * 3
    real = tok.tokenizer.encode(text, add_special_tokens=False).ids
    rng = random.Random(0)
    cases = [real] + [[rng.randrange(2048) for _ in range(60)] for _ in range(30)]
    assert sum(tok.decode(ids[:k]).endswith("\ufffd") for ids in cases for k in range(len(ids))) > 50
    for ids in cases:
        full = tok.decode(ids)
        inc = IncrementalText(tok.decode)
        for k in range(1, len(ids) + 1):
            assert inc.add(ids[:k]) is None
            assert full.startswith(inc.text) and not inc.text.endswith("\ufffd")
            assert tok.decode(ids[:k]).startswith(inc.text)
        inc.finish(ids)
        assert inc.text == full
    assert IncrementalText(tok.decode).add(real[:1]) is None


def test_incremental_text_stops_where_the_whole_text_search_stops(tokenizer_file):
    tok = ChatTokenizer.from_folder(tokenizer_file.parent, 2048, tokenizer_file)
    ids = tok.tokenizer.encode("one two three four five six seven", add_special_tokens=False).ids
    full = tok.decode(ids)
    for stops in (("four",), ("ree f", "two"), ("o t", "e s"), ("nine",)):
        inc, cut = IncrementalText(tok.decode, stops), None
        for k in range(1, len(ids) + 1):
            cut = inc.add(ids[:k])
            if cut is not None:
                assert cut == earliest_stop(tok.decode(ids[:k]), stops)
                assert earliest_stop(tok.decode(ids[: k - 1]), stops) is None
                break
        assert cut == earliest_stop(full, stops)


def test_incremental_detokenization_decodes_a_bounded_window_per_token():
    """The old engine decoded the whole output after every token: n^2 / 2 token decodes for n
    tokens. Now the tokens decoded per new token are bounded, also when every token ends in an
    incomplete character (the MAX_PENDING cap)."""
    decoded = 0

    def decode(ids):
        nonlocal decoded
        decoded += len(ids)
        return "".join("\ufffd" if i % 2 else f"<{i}>" for i in ids)

    for stream in ([2 * i for i in range(2000)], [2 * i + 1 for i in range(2000)]):
        decoded = 0
        inc = IncrementalText(decode)
        for k in range(1, len(stream) + 1):
            inc.add(stream[:k])
        inc.finish(stream)
        assert inc.text == decode(stream)
        assert decoded <= 4 * IncrementalText.MAX_PENDING * len(stream), decoded


def test_text_deltas_read_only_the_new_characters():
    """TextDeltas of the server's stream: fed a growing text, it reads each character once."""
    stop = CountingStr("x" * 1023 + "y")
    deltas, text, shown = TextDeltas((stop,)), "", ""
    CountingStr.reads = 0
    for _ in range(3000):
        text += "xxxxxx"
        shown += deltas.update(text, finished=False)
    shown += deltas.update(text, finished=True)
    assert shown == text
    assert CountingStr.reads <= 4 * len(text), CountingStr.reads


def test_the_engine_decodes_each_token_once_in_a_short_window(folder):
    """Through the Engine: a 250-token generation decodes a few tokens per new token (the old
    _emit decoded the whole output every time: 250 * 251 / 2 = 31,375 token decodes), and its
    text is still the decode of its tokens."""
    from dsv3.infer.cli import load
    from dsv3.infer.sampling import SamplingParams

    engine, tok = load(folder, max_batch_size=1)
    decoded = 0

    def counting_decode(ids):
        nonlocal decoded
        decoded += len(ids)
        return tok.decode(ids)

    engine.decode = counting_decode
    (out,) = engine.generate(
        [tok.encode("def f(x):")], SamplingParams(max_tokens=250, temperature=1.0, seed=3, ignore_eos=True)
    )
    assert len(out.token_ids) == 250 and out.text == tok.decode(out.token_ids)
    assert decoded <= 6 * 250, decoded
