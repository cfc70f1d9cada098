"""metrics.jsonl after a crash: a partial last line is dropped by every reader (dsv3.train.metrics)."""

from __future__ import annotations

import json

import pytest

from dsv3.errors import DataError
from dsv3.train.metrics import MetricsLog, read_metrics, write_report

RECORDS = [{"step": s, "loss": 5.0 - s, "lr": 1e-3} for s in (1, 2, 3)]


def write_killed_mid_line(path):
    """Three whole records and the first half of a fourth, as a run killed mid-write leaves it."""
    fourth = json.dumps({"step": 4, "loss": 1.0, "lr": 1e-3})
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + fourth[: len(fourth) // 2])


def test_partial_last_line_is_dropped_by_readers_resume_and_report(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_killed_mid_line(path)
    assert read_metrics(path) == RECORDS
    assert write_report(path, tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    log = MetricsLog(path, keep_up_to_step=2)  # resuming from the checkpoint at step 2
    log.log({"step": 3, "loss": 0.5, "lr": 1e-3})
    log.close()
    assert read_metrics(path) == [*RECORDS[:2], {"step": 3, "loss": 0.5, "lr": 1e-3}]


def test_fresh_run_starts_a_new_file_over_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lo\n{"step": 2}\n')
    MetricsLog(path, keep_up_to_step=None).close()
    assert path.read_text() == ""


def test_bad_line_before_the_end_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\nnot json\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(DataError, match=rf"{path} line 2 is not a JSON record"):
        read_metrics(path)


def test_report_of_no_records_is_a_one_line_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lo')
    with pytest.raises(DataError, match="has no records to plot"):
        write_report(path, tmp_path / "report.png")
