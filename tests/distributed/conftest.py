import pytest
from _parallel_helpers import reference


@pytest.fixture(scope="module")
def root(request, tmp_path_factory):
    """A working folder per test module (corpus, token cache, runs)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def ref(root):
    """The single-process reference run of the micro model (2 layers)."""
    return reference(root)
