# depois-stream developer entry points. Everything runs inside .venv so a fresh machine needs
# only python3 (>= 3.10) with its venv module (Debian/Ubuntu: python3-venv). torch is pinned to
# 2.13.0, the CPU wheel on the project's package index (an unpinned torch pulls CUDA builds);
# where the index serves CUDA wheels, `make install TORCH_PIP_ARGS='--index-url
# https://download.pytorch.org/whl/cpu'` asks for the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIP_ARGS ?=
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pip runs when the stamp is missing or older than pyproject.toml, so `make test` and `make
# test-fast` on an installed checkout neither wait for pip nor need the package index
# (`rm $(VENV)/.installed` forces a reinstall, e.g. with other TORCH_PIP_ARGS).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install -q -e '.[train,eval,dev,fast,signing,deploy-check]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m depois_stream.sim.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Quix Streams (the peer of benchmarks/bench_peers.py) pins confluent-kafka < 2.13; depois-stream
# needs 2.16 or later, so Quix gets an environment of its own.
QUIX_VENV ?= .venv-quix

# The stamp is written only after pip succeeded, so a failed install is retried next time.
$(QUIX_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install -q --upgrade pip
	$(QUIX_VENV)/bin/pip install -q -e '.[peers]'
	touch $@

bench: install $(QUIX_VENV)/.installed
	$(BIN)/python benchmarks/run_all.py --quix-python $(QUIX_VENV)/bin/python

clean:
	rm -rf artifacts runs .pytest_cache
