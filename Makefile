# depois-stream developer entry points. Everything runs inside .venv so a fresh machine needs
# only python3 (>= 3.10); torch is pinned to the CPU wheel (an unpinned torch pulls CUDA builds).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,eval,dev,fast,signing,deploy-check]'

demo: install
	$(BIN)/python -m depois_stream.sim.demo

test: install
	$(BIN)/python -m pytest -q

test-fast:
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
