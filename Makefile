# `make test` and `make demo` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint format bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned request would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py --write docs/benchmarks.md
	$(PY) benchmarks/train_speed.py --write docs/benchmarks.md
	$(PY) benchmarks/generation_speed.py --write docs/benchmarks.md
	$(PY) benchmarks/lookup_speed.py --write docs/benchmarks.md

demo: $(STAMP)
	$(PY) -m mamba_slm demo --output-dir runs/demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info
