# The commands a person types. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: demo test test-fast docs lint format bench bench-gpu bench-efficacy clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export,docs]'
	touch $(STAMP)

demo: $(STAMP)  ## teacher, student and every method on the embedded digits, on the CPU
	$(BIN)/python -m distill.demo

test: $(STAMP) docs  ## the documentation site (strict), then the whole test suite, CPU only, no network
	$(BIN)/python -m pytest -n 2 tests

test-fast: $(STAMP)  ## the tests that are neither slow nor multi-process (under a minute)
	$(BIN)/python -m pytest -n 2 -m "not slow and not ddp" tests

docs: $(STAMP)  ## the documentation site into site/, strict: a broken link or reference fails; figures drawn from the code
	$(BIN)/python docs/_tools/figures.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it stops warnings from counting

lint: $(STAMP)  ## ruff lint and format check (configured in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## CPU speed measurements, as ratios against plain PyTorch baselines
	$(BIN)/python benchmarks/step_overhead.py --device cpu --threads 1 --clock cpu
	$(BIN)/python benchmarks/step_pairs.py --lightning --manual --calibrate
	$(BIN)/python benchmarks/overhead.py --device cpu
	$(BIN)/python benchmarks/data.py --device cpu
	$(BIN)/python benchmarks/imagenet_data.py --device cpu
	$(BIN)/python benchmarks/pwkd_width.py --device cpu
	$(BIN)/python benchmarks/teacher_cache.py --device cpu

bench-gpu: $(STAMP)  ## the same on a GPU, plus seconds per CIFAR-100 epoch (fp32; bf16 + channels_last + compile, default and reduce-overhead)
	$(BIN)/python benchmarks/step_overhead.py --device cuda
	$(BIN)/python benchmarks/step_overhead.py --device cuda --compile
	$(BIN)/python benchmarks/step_overhead.py --device cuda --same-process --lightning
	$(BIN)/python benchmarks/overhead.py --device cuda
	$(BIN)/python benchmarks/data.py --device cuda
	$(BIN)/python benchmarks/imagenet_data.py --device cuda --workers 8
	$(BIN)/python benchmarks/pwkd_width.py --device cuda
	$(BIN)/python benchmarks/teacher_cache.py --device cuda
	$(BIN)/python benchmarks/gpu_epoch.py --device cuda
	$(BIN)/python benchmarks/gpu_epoch.py --device cuda --precision bf16-mixed --channels-last --compile
	$(BIN)/python benchmarks/gpu_epoch.py --device cuda --precision bf16-mixed --channels-last --compile reduce-overhead

bench-efficacy: $(STAMP)  ## every paradigm vs its controls on Fashion-MNIST, 3 seeds (CPU, up to an hour on 2 cores)
	$(BIN)/python benchmarks/efficacy.py

clean:
	rm -rf $(VENV) runs *.egg-info site docs/figures
