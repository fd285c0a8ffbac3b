# One-command set-up: `make demo` and `make test` create .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmpt-installed
# CPU build of torch (the default on these machines); CUDA users install their own torch first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast lint format clean docs

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,mpi]"
	touch $(STAMP)

demo: setup
	$(BIN)/pretrain demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache build *.egg-info

docs: setup
	$(BIN)/python scripts/update_readme_config.py
