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

# Two workers, then the `serial` tests alone. Run one at a time the suite leaves the CPU about
# 75 % idle (it mostly waits on brokers, group joins and timeouts), so two workers halve it on
# a 2-core machine; the tests that bound how long the product takes (a start, a stop, a page)
# would measure a neighbour's load as well, so they run after, alone. Both parts always run;
# exit status 5 (nothing selected, e.g. by a -k in PYTEST_ADDOPTS) is not a failure.
# $(call two_parts, and MARKERS) narrows both parts.
two_parts = rc=0; \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial$(1)" || [ $$? -eq 5 ] || rc=1; \
	$(BIN)/python -m pytest -q -m "serial$(1)" || [ $$? -eq 5 ] || rc=1; \
	exit $$rc

test: install
	@$(call two_parts,)

test-fast: install
	@$(call two_parts, and not slow)

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
