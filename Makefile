# Two commands do all the set-up (README): `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch. On a CUDA machine: make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0

export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast lint repro clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

run: $(BIN)/.installed  ## create the environment, install, run the whole pipeline (Prefect flow)
	$(BIN)/python -m flows.pipeline

# two workers, a test module each at a time: much of a test's time is processes starting and servers answering
test: $(BIN)/.installed  ## the test suite: every test (what CI runs, after lint)
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: $(BIN)/.installed  ## the edit loop: all but the tests marked slow (real servers, browsers, multi-rank faults)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

lint: $(BIN)/.installed  ## ruff (lint + format check) and mypy on tasks/ and flows/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

repro: $(BIN)/.installed  ## the same pipeline through DVC
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

clean:
	rm -rf $(VENV) data/raw data/features models reports .pytest_cache
