# dsv3: two commands work on a fresh machine.
#   make run   set up .venv and run the main job on the embedded default (tiny preset, CPU)
#   make test  set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned to the CPU build that lies on this machine's disk;
# a loose `pip install torch` could pull a multi-GB CUDA build instead.
TORCH  ?= torch==2.13.0

.PHONY: setup run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m dsv3 demo

test: setup
	$(PY) -m pytest -q -n 2 --timeout 600 tests

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
