"""Data sources in the formats people keep data in (dsv3.train.sources): JSON Lines, Parquet, text
files and folders, `datasets` folders; bad records counted and named; corpora streamed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from dsv3.errors import DataError
from dsv3.tokenizer import load_tokenizer
from dsv3.train.data import Corpus, build_token_cache

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

TEXTS = ["the first document.", "a second one, longer than the first.", "third: ünïcode ✓"]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]


def write_jsonl(path: Path, rows: list, raw: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw))
    return path


def texts(corpus: Corpus) -> list[str]:
    return list(corpus)


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return load_tokenizer(tokenizer_file, max_vocab=4096)


# ------------------------------------------------------------------------------------------ formats
def test_json_lines_read_the_text_field_or_the_one_named(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)], ["\n", "  \n"]
    )
    assert texts(Corpus([str(path)])) == TEXTS  # blank lines are not records
    other = write_jsonl(tmp_path / "b.json", [{"body": t} for t in TEXTS])  # .json: JSON Lines too
    assert texts(Corpus([str(other)], text_field="body")) == TEXTS


def test_a_json_array_file_is_refused_with_the_conversion(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": t} for t in TEXTS], indent=2))
    with pytest.raises(DataError, match=rf"{path} holds a JSON array; dsv3 reads JSON Lines .*jq -c"):
        Corpus([str(path)])


def test_parquet_reads_the_column_a_batch_at_a_time(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": TEXTS}), path, row_group_size=2)
    assert texts(Corpus([str(path)], text_field="content")) == TEXTS
    records = [r for _, r in Corpus([str(path)], text_field="content").records()]
    assert [r.where for r in records] == [f"Parquet file {path} row {i}" for i in range(3)]
    assert sum(r.size for r in records) == path.stat().st_size  # progress adds up to the file


def test_a_parquet_file_without_the_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": TEXTS}), path)
    with pytest.raises(DataError, match=rf"Parquet file {path} has no column 'text' \(columns: body\)"):
        Corpus([str(path)])


def test_datasets_saved_to_disk_are_loaded_offline(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    assert texts(Corpus([str(tmp_path / "ds")])) == TEXTS
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"t": TEXTS}), "test": datasets.Dataset.from_dict({"t": ["x"]})}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert texts(Corpus([str(tmp_path / "dd")], text_field="t")) == TEXTS  # the train split
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"t": ["x"]})}).save_to_disk(
        str(tmp_path / "only")
    )
    with pytest.raises(DataError, match="has no 'train' split \\(splits: test\\)"):
        Corpus([str(tmp_path / "only")], text_field="t")
    with pytest.raises(DataError, match=rf"dataset {tmp_path / 'ds'} has no column 'body'"):
        Corpus([str(tmp_path / "ds")], text_field="body")


def test_a_folder_reads_its_text_json_lines_and_parquet_files_in_path_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("plain text")
    write_jsonl(folder / "b.jsonl", [{"text": "from jsonl"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), folder / "sub" / "c.parquet")
    (folder / "config.json").write_text('{"not": "data"}')  # .json in folders is configuration
    assert texts(Corpus([str(folder)])) == ["plain text", "from jsonl", "from parquet"]


def test_chats_are_read_from_every_format(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}])
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "b.parquet")
    datasets.Dataset.from_dict({"messages": [CHAT]}).save_to_disk(str(tmp_path / "ds"))
    for spec in ("a.jsonl", "b.parquet", "ds"):
        [(_, record)] = list(Corpus([str(tmp_path / spec)]).records())
        assert record.messages == CHAT and record.text is None


def test_missing_optional_packages_name_the_package_and_the_extra(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"a.parquet needs the `pyarrow` package: pip install 'dsv3\[data\]'"):
        Corpus([str(tmp_path / "a.parquet")])
    with pytest.raises(DataError, match=r"ds needs the `datasets` package: pip install 'dsv3\[data\]'"):
        Corpus([str(tmp_path / "ds")])


# -------------------------------------------------------------------------------------- bad records
BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"body": "x"}', "no 'text' field and no 'messages'"),
    ('{"text": 7}', "'text' is int, not a string"),
    ('{"messages": "hi"}', "'messages' must be a list of objects"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages\\[0\\].role='bot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn to learn"),
    (b'{"text": "\xff\xfe"}', "not valid JSON"),  # bytes that are not UTF-8
]


def test_bad_records_are_counted_named_and_skipped(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    with open(path, "wb") as f:
        for i, (line, _) in enumerate(BAD):
            f.write(json.dumps({"text": TEXTS[i % 3]}).encode() + b"\n")  # good records on odd lines
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    corpus = Corpus([str(path)])
    records = [r for _, r in corpus.records()]
    for (_, why), record in zip(BAD, records[1::2]):
        assert record.problem is not None and record.text is None and record.messages is None
        assert re.search(why, record.problem), record.problem
    assert [r.where for r in records[1::2]] == [f"{path}:{2 * i + 2}" for i in range(len(BAD))]
    cache = build_token_cache(corpus, tok, 0.01, tmp_path / "cache")
    [source] = cache.meta["sources"]
    assert (source["documents"], source["bad"]) == (len(BAD), len(BAD))
    summary = cache.split(seq_len=8).summary
    assert f"8 bad records in {path} skipped ({path}:2: not valid JSON" in summary
    assert (
        f"; {path}:4: a JSON list, not an object; {path}:6: no 'text' field" in summary
        and ", ...)" in summary
    )


def test_a_source_whose_records_are_all_bad_is_an_error_naming_it(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": t} for t in TEXTS])
    with pytest.raises(
        DataError,
        match=rf"every record of data source {bad} is bad \(3 records\); the first, "
        rf"{bad}:1: no 'text' field",
    ):
        build_token_cache(Corpus([str(good), str(bad)]), tok, 0.01, tmp_path / "cache")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="data source .*empty.jsonl holds no records"):
        list(Corpus([str(tmp_path / "empty.jsonl")]))


# ------------------------------------------------------------------------------------- streaming
def test_max_bytes_stops_reading_after_that_much_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i}"} for i in range(100)])
    line = len(json.dumps({"text": "document 0"})) + 1
    assert texts(Corpus([str(path)], max_bytes=10 * line)) == [f"document {i}" for i in range(10)]


def test_the_fingerprint_follows_the_data_and_the_field_not_the_weight(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "body": t} for t in TEXTS])
    first = Corpus([str(path)]).fingerprint()
    assert Corpus([f"{path}:0.5"]).fingerprint() == first
    assert Corpus([str(path)], text_field="body").fingerprint() != first
    write_jsonl(path, [{"text": t} for t in TEXTS[:2]])
    assert Corpus([str(path)]).fingerprint() != first


def peak_growth_mb(work) -> float:
    """How far this process's peak resident memory rose above its resident memory while work() ran."""

    def status(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    work()
    return status("VmHWM") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_corpus_larger_than_the_memory_budget_streams(tmp_path, tok):
    line = json.dumps({"text": "lorem ipsum dolor sit amet, " * 36}) + "\n"  # ~1 KB
    big = tmp_path / "big.jsonl"
    big.write_text(line * 50_000)  # 50 MB: read record by record
    assert peak_growth_mb(lambda: sum(1 for _ in Corpus([str(big)]))) < 5
    small = tmp_path / "small.jsonl"
    small.write_text(line * 5_000)  # 5 MB, 1.7M tokens: tokenized into the cache batch by batch
    tok.tokenizer.encode_batch(["warm up the thread pool"] * 8)
    growth = peak_growth_mb(lambda: build_token_cache(Corpus([str(small)]), tok, 0.01, tmp_path / "cache"))
    assert growth < 5  # the texts alone are 5 MB; their token ids as Python lists many times that
