# The two commands the README promises: `make train` and `make test`. Both install what they need first.
SHELL := /bin/bash
PY ?= python3
# Reuse an active virtualenv; otherwise keep everything in .venv at the repository root.
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.gateloop_jax-installed
WORKDIR ?= workdirs/memory_horizon
PYTEST_ARGS ?=

.PHONY: install test train bench lint format-check clean

install: $(STAMP)

# Re-install only when the dependency list changes (idempotent, fast when nothing changed).
$(STAMP): setup.py
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[dev,bench,eval]"
	@touch $@

test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS)

train: install
	$(PYTHON) -m gateloop_jax.main --config configs/memory_horizon.py:runlocal --workdir $(WORKDIR)

# The style check CI runs (ruff.toml: pycodestyle incl. 4-space indentation, pyflakes); changes nothing.
lint: install
	$(PYTHON) -m ruff check .

# The formatter's verdict on the whole tree (not yet enforced by CI: part of the tree predates ruff format).
format-check: install
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) experiments/bench_modes.py --out experiments/results

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
