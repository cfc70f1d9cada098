from pathlib import Path

import pytest

from fixtures import save_micro_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_file) -> Path:
    """The micro model of _micro.py saved with the tests' tokenizer."""
    return save_micro_model(tmp_path_factory.mktemp("micro") / "micro", tokenizer_file)
