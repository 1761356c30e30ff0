# Two commands do all set-up on a fresh clone:
#   make demo   runs the tiny CPU plan (jobs/examples/tiny-cpu.yaml) under the daemon
#   make test   runs the test suite
# Both create .venv on first use. torch is pinned to a CPU build here; on a GPU
# machine install the CUDA build of torch into .venv first and `make` keeps it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench drill clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m daemon.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m bench

drill: $(STAMP)
	$(PY) -m daemon.cli drill

clean:
	rm -rf $(VENV) .demo bench/results
