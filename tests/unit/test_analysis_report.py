"""`dsv3 analyze`: the paper comparison, JSON interfaces, Markdown, plots, errors, import weight."""

import argparse
import json
import subprocess
import sys

import pytest

from dsv3.analysis import cli, report
from dsv3.analysis.hardware import load_catalog


def analyze(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dsv3 analyze")
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args(list(argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_paper_row_reproduces_and_the_known_paper_slip_is_flagged():
    rows = report.paper_comparisons(load_catalog())
    assert {r.table for r in rows} >= {"Table 1", "Table 2", "Table 3", "Table 4", "Table 5"}
    assert any(r.table.startswith("EP limit H800") for r in rows)
    assert any(r.table.startswith("EP limit GB200") for r in rows)
    bad = [r for r in rows if not r.ok]
    assert [r.quantity for r in bad] == ["LLaMA-3.1 405B / V3"]
    assert bad[0].status == "paper off" and "7.34" in bad[0].note
    qwen = next(r for r in rows if r.quantity == "training qwen2.5-72b")
    assert qwen.exact_count == pytest.approx(444.87, abs=0.01)


def test_paper_json(capsys):
    code, out, _ = analyze(capsys, "paper", "--json")
    data = json.loads(out)
    assert code == 0 and data["all_ok"] is True
    row = data["rows"][0]
    assert set(row) >= {
        "table",
        "quantity",
        "unit",
        "ours",
        "paper",
        "diff",
        "rel_diff",
        "ok",
        "status",
        "note",
    }
    assert row["ours"] == row["paper"] == 70_272


@pytest.mark.parametrize("command", ["kv-cache", "flops"])
def test_model_json_interface(capsys, command):
    code, out, _ = analyze(capsys, command, "--config", "v3-671b", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["kv_cache_bytes_per_token"] == 70_272
    assert data["total_params"] == 671_026_419_200
    assert data["activated_params"] == 37_552_297_472
    assert data["training_flops_per_token"] / 1e9 == pytest.approx(250.46, abs=0.01)


def test_compared_models_and_dtype(capsys, tmp_path):
    _code, out, _ = analyze(
        capsys, "kv-cache", "--config", "qwen2.5-72b", "--vs", "llama-3.1-405b", "--dtype", "fp8", "--json"
    )
    data = json.loads(out)
    assert data["kv_cache_bytes_per_token"] == 163_840
    assert data["compared"][0]["kv_cache_bytes_per_token"] == 258_048


def test_markdown_and_rich_outputs(capsys):
    code, out, _ = analyze(capsys, "network", "--markdown")
    assert code == 0 and "| FT2 | 2,048 | 96 | 2,048 |" in out
    code, out, _ = analyze(
        capsys, "memory", "--config", "v3-671b", "--pp", "16", "--ep", "64", "--dp", "128", "--recompute"
    )
    assert code == 0 and "Training memory per GPU" in out
    code, out, _ = analyze(
        capsys, "inference-limit", "--hardware", "GB200-NVL72", "--link", "scale-up", "--json"
    )
    assert json.loads(out)["ep_decode_limit"]["comm_us"] == pytest.approx(6.72 * 7168 / 7000)


def test_plots_are_written_headless(capsys, tmp_path):
    code, _, err = analyze(capsys, "paper", "--markdown", "--plots", str(tmp_path))
    assert code == 0
    for name in ("kv_cache.png", "tpot_vs_bandwidth.png", "cost_per_endpoint.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["kv-cache", "--config", "gpt-5"], "unknown model 'gpt-5'"),
        (["inference-limit", "--hardware", "TPU9"], "unknown hardware 'TPU9'"),
        (["inference-limit", "--bandwidth", "-1"], "bandwidth_gbps=-1.0 must be > 0"),
        (["network", "--radix", "5"], "even switch radix"),
        (["memory", "--tp", "3"], "tp=3 must divide num_heads=128"),
        (["kv-cache", "--dtype", "int2"], "dtype='int2'"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, out, err = analyze(capsys, *argv)
    assert code == 2 and message in err and out == ""


def test_analyze_is_registered_and_core_import_stays_light():
    from dsv3.cli import COMMANDS

    assert ("analyze", "dsv3.analysis.cli") in [(name, module) for name, module, _ in COMMANDS]
    code = "import sys, dsv3, dsv3.analysis.cli; print('matplotlib' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
