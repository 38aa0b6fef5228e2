# Two commands a new user needs: `make demo` and `make test`. Both build the venv themselves.
# torch==2.13.0 is installed first: that pins the CPU build on this machine; a bare `torch`
# requirement with no torch present would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench browser screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The dashboard test drives a real headless Chromium (Debian's chromium + chromium-driver packages);
# installed here when missing (needs root or sudo, as in CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$(command -v sudo || true); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lin_probe tests examples benchmarks reproduce tools
	$(BIN)/ruff format --check lin_probe tests examples benchmarks reproduce tools

# The dashboard's screenshots in docs/figures/ (the README shows one): the full demo, then TensorBoard in Chromium.
screenshots: $(STAMP) browser
	$(BIN)/python tools/screenshots.py --out docs/figures

bench: $(STAMP)
	$(BIN)/python benchmarks/ntk_speed.py

# Not in CI: builds benchmarks/peers/.venv (jax 0.4.23, neural-tangents 0.6.5) and prints the
# lin_probe table, then neural-tangents' on the same configs. E.g. BENCH_ARGS="--quick --threads 1".
BENCH_ARGS ?=
.PHONY: bench-peers
bench-peers: $(STAMP)
	benchmarks/peers/setup_venv.sh $(PYTHON)
	$(BIN)/python benchmarks/ntk_speed.py $(BENCH_ARGS)
	benchmarks/peers/.venv/bin/python benchmarks/peers/nt_speed.py $(BENCH_ARGS)

# Every number and figure of docs/reproduction.md (figures into docs/figures/); ~12-20 min on 2 cores.
.PHONY: reproduce
reproduce: $(STAMP)
	$(BIN)/python reproduce/table1_coefficients.py
	$(BIN)/python reproduce/table2_spectral_error.py
	$(BIN)/python reproduce/digits_runs.py
	$(BIN)/python reproduce/figure2_exit_step.py
	$(BIN)/python reproduce/memo_comparison.py
	$(BIN)/python reproduce/paper_setting.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache lightning_logs runs
