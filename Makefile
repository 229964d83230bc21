# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: all venv bench-venv demo test test-slow lint fixtures bench clean

all: test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $@

venv: $(BIN)/.installed

# mergekit for benchmarks/bench_extract.py, in its own venv: mergekit pins its own versions of
# transformers, safetensors, click…, which must not touch the project's. Same CPU torch.
MERGEKIT_SPEC ?= mergekit==0.1.5
BENCH_VENV := benchmarks/_work/mergekit-venv

$(BENCH_VENV)/.installed:
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/pip install -q "$(MERGEKIT_SPEC)"
	touch $@

bench-venv: $(BENCH_VENV)/.installed

demo: venv
	$(BIN)/python -m loratool.demo

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The tests marked slow (deselected by `make test`): the long randomized interruption run.
test-slow: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow tests

lint: venv
	$(BIN)/ruff check loratool tests benchmarks fixtures
	$(BIN)/ruff format --check loratool tests benchmarks fixtures

fixtures: venv
	$(BIN)/python fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) .demo-home .demo-out
