# Two commands do all set-up on a fresh clone:
#   make demo   runs the tiny CPU plan (jobs/examples/tiny-cpu.yaml) under the daemon
#   make test   runs the test suite
# Both create .venv on first use (and `make test` .venv-nanochat, the real nanochat's
# interpreter, when ../shared/nanochat is there). torch is pinned to a CPU build here; on a GPU
# machine install the CUDA build of torch into .venv first and `make` keeps it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The real nanochat (two commits, offline data) that the tests and benchmarks run, when it is
# there; its own interpreter, built from its requirements.txt with the CPU torch first.
NANOCHAT_SRC ?= ../shared/nanochat
export NANOCHAT_SRC   # the tests find it there too (tests/nanochat_harness.py)
NC_VENV      := .venv-nanochat
NC_STAMP     := $(NC_VENV)/.installed

.PHONY: setup nanochat-venv demo test bench drill clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

ifneq ($(wildcard $(NANOCHAT_SRC)/requirements.txt),)
$(NC_STAMP): $(NANOCHAT_SRC)/requirements.txt
	test -x $(NC_VENV)/bin/python || $(PYTHON) -m venv $(NC_VENV)
	$(NC_VENV)/bin/python -m pip install -q --upgrade pip
	$(NC_VENV)/bin/python -c "import torch" 2>/dev/null || $(NC_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(NC_VENV)/bin/python -m pip install -q -r $(NANOCHAT_SRC)/requirements.txt
	touch $(NC_STAMP)
nanochat-venv: $(NC_STAMP)
else
nanochat-venv:
	@echo "no $(NANOCHAT_SRC): the tests against the real nanochat will be skipped"
endif

demo: $(STAMP)
	$(PY) -m daemon.demo

test: $(STAMP) nanochat-venv
	$(PY) -m pytest -q -p no:cacheprovider -n 3 --dist loadgroup --durations=15

bench: $(STAMP) nanochat-venv
	$(PY) -m bench

drill: $(STAMP)
	$(PY) -m daemon.cli drill

clean:
	rm -rf $(VENV) $(NC_VENV) .demo bench/results
