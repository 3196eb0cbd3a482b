# The commands a person types. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export]'
	touch $(STAMP)

demo: $(STAMP)  ## teacher, student and every method on the embedded digits, on the CPU
	$(BIN)/python -m distill.demo

test: $(STAMP)  ## the whole test suite, CPU only, no network
	$(BIN)/python -m pytest -n 2 tests

lint: $(STAMP)
	$(BIN)/python -m compileall -q distill tests

bench: $(STAMP)  ## speed measurements as ratios against plain PyTorch loops
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs *.egg-info
