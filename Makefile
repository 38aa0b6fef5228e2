# Two commands a new user needs: `make demo` and `make test`. Both build the venv themselves.
# torch==2.13.0 is installed first: that pins the CPU build on this machine; a bare `torch`
# requirement with no torch present would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lin_probe tests examples benchmarks
	$(BIN)/ruff format --check lin_probe tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/ntk_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache lightning_logs runs
