# Two entry points, each self-contained on a fresh machine:
#   make demo   -> creates .venv, installs histofm, runs the end-to-end job on bundled data
#   make test   -> creates .venv, installs histofm[dev], runs the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# torchscale (an oracle for the slide encoder) pins timm==0.6.13, which open_clip's timm>=1.0.17
	# contradicts; its code runs with current timm, so it is installed without its pins, with the one
	# dependency its encoder imports (fairscale).
	$(BIN)/python -m pip install --quiet --no-deps "torchscale>=0.3" "fairscale>=0.4"
	touch $(STAMP)

.PHONY: install demo test lint bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/histofm demo --out demo_out

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/python -m pytest -x -p no:cacheprovider --timeout=900 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/vit_vs_timm.py
