"""Bad input to `dsv3 info` and `dsv3 analyze` is one line `error: ...` and exit status 2, no traceback."""

from __future__ import annotations

import json

import pytest

from dsv3.analysis.hardware import HardwareError
from dsv3.analysis.limits import LimitError
from dsv3.analysis.network import NetworkError
from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError, UserError


@pytest.fixture
def configs(tmp_path):
    """Broken config files: not JSON, a JSON array, an invalid value."""
    (tmp_path / "malformed.json").write_text('{"hidden_size": ')
    (tmp_path / "array.json").write_text("[1, 2]")
    zero = {**ModelConfig.from_preset("tiny").to_hf(), "hidden_size": 0}
    (tmp_path / "hidden0.json").write_text(json.dumps(zero))
    return tmp_path


def one_line_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    return out.err


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9-huge", "'v9-huge' is neither a preset"),
        ("missing.json", "is neither a preset"),
        ("malformed.json", "malformed.json is not valid JSON"),
        ("array.json", "array.json holds an array, not a JSON object"),
        ("hidden0.json", "hidden0.json: hidden_size=0"),
    ],
)
def test_info_bad_model(capsys, configs, monkeypatch, name, message):
    monkeypatch.chdir(configs)
    assert message in one_line_error(capsys, "info", name)


@pytest.mark.parametrize("flag", ["--config", "--vs"])
@pytest.mark.parametrize(
    "name, message",
    [
        ("malformed.json", "malformed.json is not valid JSON"),
        ("array.json", "array.json holds an array, not a JSON object"),
    ],
)
def test_analyze_bad_model_file(capsys, configs, flag, name, message):
    assert message in one_line_error(capsys, "analyze", "kv-cache", flag, str(configs / name))


def test_config_file_errors_name_the_file(configs):
    (configs / "checkpoint").mkdir()
    with pytest.raises(ConfigError, match=rf"no config.json at {configs / 'checkpoint' / 'config.json'}"):
        ModelConfig.from_hf(configs / "checkpoint")
    with pytest.raises(ConfigError, match=r"malformed.json is not valid JSON: Expecting value: line 1"):
        ModelConfig.from_hf(configs / "malformed.json")
    (configs / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ConfigError, match="latin1.json is not valid JSON"):
        ModelConfig.from_hf(configs / "latin1.json")


@pytest.mark.parametrize("error", [HardwareError, LimitError, NetworkError])
def test_analysis_errors_are_user_errors(error):
    assert issubclass(error, UserError)
