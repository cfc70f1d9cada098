from pathlib import Path

import pytest
import torch

# Tests run tiny models under pytest-xdist on few cores: one intra-op thread per worker is faster
# and avoids the 100 ms stalls of oversubscribed threads.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (vocab 2048, <|bos|> = 0, <|eos|> = 1) trained on the first
    MB of the Python stdlib, as `dsv3 train` trains its own; a few seconds, once per worker."""
    from dsv3.tokenizer import train_tokenizer
    from dsv3.train.data import Corpus

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(Corpus(["stdlib"], max_bytes=1_000_000), 2048).save(str(path))
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
