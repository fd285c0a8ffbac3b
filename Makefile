# One-command set-up: `make demo` and `make test` create .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmpt-installed
# torch with a matching torchvision (open_clip_torch, used by `bench step --vs open_clip` and the export
# tests, imports torchvision). CUDA users install their own torch + torchvision first; this is skipped then.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast lint format clean docs system-deps bench-gpu

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml scripts/build_deps.sh
	sh scripts/build_deps.sh $(PY)
	@# a venv without pip (made while python3-venv was missing, or by `uv venv`): pip is added to it,
	@# never by deleting it (it may hold the user's own CUDA torch); a missing one is made
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || $(PY) -m venv --without-pip $(VENV)
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --upgrade
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,mpi,data,clip]"
	touch $(STAMP)

# extra config overrides for the demo, e.g. `make demo DEMO_ARGS=parallel.tp=2` (2 ranks: tp=2 x dp=1)
DEMO_ARGS ?=

demo: setup
	$(BIN)/pretrain demo --out runs/demo $(DEMO_ARGS)

# Debian packages the launch tests run for real (tests/test_launch_*.py): Slurm with munge, Open MPI,
# iproute2. Installed only as root where apt-get exists (CI); elsewhere nothing happens and those tests
# skip saying why. Idempotent: nothing is done when every program is there. MPI goes in before Slurm
# (slurmd must find it when it starts, for srun --mpi=pmix); a temporary policy-rc.d keeps apt from
# starting the system's own daemons, since the tests start private ones.
SYSTEM_PROGRAMS := mpirun munged slurmctld slurmd sbatch ip
MPI_PACKAGES := openmpi-bin libopenmpi-dev
SLURM_PACKAGES := munge slurm-wlm slurmctld slurmd slurm-client iproute2

system-deps:
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "system-deps: not root or no apt-get: skipping (Slurm/MPI launch tests will skip)"; exit 0; fi; \
	missing=""; for p in $(SYSTEM_PROGRAMS); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	echo "system-deps: installing Debian packages for:$$missing"; \
	rc_policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; rc_policy=1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && \
	apt-get install -y -qq --no-install-recommends $(MPI_PACKAGES) >/dev/null && \
	apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES) >/dev/null; status=$$?; \
	[ -n "$$rc_policy" ] && rm -f /usr/sbin/policy-rc.d; exit $$status

# open_clip_train (the baseline of `pretrain bench quality`) pins webdataset<=0.2.86: it gets a small
# overlay venv that reuses .venv's torch and open_clip (pretrain/bench/quality_openclip.py), so its test runs;
# LAION's clip_benchmark CLI lives there too (tests/e2e/test_clip_benchmark.py)
OC_VENV := .venv-openclip

$(OC_VENV)/.ok: $(STAMP) pretrain/bench/quality_openclip.py
	$(BIN)/python -m pretrain.bench.quality_openclip $(OC_VENV)
	touch $@

test: setup system-deps $(OC_VENV)/.ok
	MMPT_OPEN_CLIP_PYTHON=$(CURDIR)/$(OC_VENV)/bin/python $(BIN)/python -m pytest -q -n 2

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache build *.egg-info $(OC_VENV)

docs: setup
	$(BIN)/python scripts/update_readme_config.py

# ViT-B/16 CLIP+MAE+MLM throughput and MFU with each fusion switch on/off and the open_clip baseline, one
# run (< 8 min on one H100/H200); appends a table to docs/benchmarks.md. On a machine without a GPU:
# `make bench-gpu BENCH_GPU_ARGS="--device cpu --tiny"` (seconds per variant).
BENCH_GPU_ARGS ?=

bench-gpu: setup
	$(BIN)/python scripts/bench_gpu.py $(BENCH_GPU_ARGS)
