# The two commands the README promises: `make train` and `make test`. Both install what they need first.
SHELL := /bin/bash
PY ?= python3
# Reuse an active virtualenv; otherwise keep everything in .venv at the repository root.
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.gateloop_jax-installed
WORKDIR ?= workdirs/memory_horizon
PYTEST_ARGS ?=

# The Mosaic GPU kernel (mode="mosaic_gpu") needs jax >= 0.11, which needs Python >= 3.12: its tests run on CPU in
# Mosaic GPU's GPU interpret mode, in a second virtualenv on a Python 3.12 (pyenv's, or python3.12 on the PATH).
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
                     $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null))
VENV312 := .venv312
STAMP312 := $(VENV312)/.gateloop_jax-installed

.PHONY: install test test-mosaic-gpu train bench lint format-check clean

install: $(STAMP)

# Re-install only when the dependency list changes (idempotent, fast when nothing changed).
$(STAMP): setup.py
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[dev,bench,eval]"
	@touch $@

test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS)
	$(MAKE) test-mosaic-gpu

$(STAMP312): setup.py
	@test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e ".[dev]"
	@touch $@

# Where no Python 3.12 exists the kernel's tests cannot run: say so loudly (the Python 3.11 suite skips them).
test-mosaic-gpu:
ifeq ($(strip $(PY312)),)
	@echo "WARNING: no Python 3.12 found (set PY312=...): tests/mosaic_gpu_test.py did not run."
else
	$(MAKE) $(STAMP312)
	$(VENV312)/bin/python -m pytest -q -n 2 tests/mosaic_gpu_test.py
endif

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
	rm -rf $(VENV) $(VENV312) *.egg-info .pytest_cache
