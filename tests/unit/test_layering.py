"""The package's layering: the model and the inference stack never import the trainer, and the
core import stays light (the server, plots and data libraries load only when used)."""

import subprocess
import sys

import pytest

INFERENCE_SIDE = [
    "dsv3.model.transformer",
    "dsv3.infer.engine",
    "dsv3.infer.server",
    "dsv3.infer.cli",
    "dsv3.hf",
    "dsv3.gguf",
    "dsv3.fp8.resident",
]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize("module", INFERENCE_SIDE)
def test_model_and_inference_never_import_the_trainer(module):
    loaded = _modules_after(f"import {module}")
    assert module in loaded
    assert not sorted(m for m in loaded if m.startswith("dsv3.train")), f"{module} pulls in dsv3.train"


def test_core_import_is_light():
    loaded = _modules_after("import dsv3, dsv3.model.transformer")
    heavy = {"fastapi", "uvicorn", "matplotlib", "transformers", "datasets", "pyarrow", "tokenizers"}
    assert not heavy & {m.split(".")[0] for m in loaded}
