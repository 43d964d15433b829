# tinyserve: `make run` serves the bundled model and classifies a sample; `make test` runs
# every check. Both create .venv and install everything they need, apt packages included.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
LOCK := requirements.lock
# Named after the lock and pyproject.toml, so editing either reinstalls.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 8000
# The converter environment of `tinyserve convert litert` (litert-torch cannot share .venv).
LITERT_VENV ?= .venv-litert
LITERT_STAMP := $(LITERT_VENV)/.installed-$(shell cat requirements-litert.lock | cksum | cut -d' ' -f1)
# What bench-compare measures; add efficientnet-lite0=FOLDER (tinyserve import efficientnet-lite0).
COMPARE_MODELS ?= fashion-cnn:1,fashion-cnn:2,resnet50

.PHONY: help install lock data run test lint typecheck pytest format bench bench-compare clean \
	ui-screenshots reliability reliability-quick litert-env

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# Exactly the locked versions (--no-deps: a package missing from the lock is not fetched
# unpinned, pip check names it instead), then tinyserve itself.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@$(BIN)/python -m pip check || { echo "$(LOCK) misses a requirement: make lock" >&2; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) data  ## create .venv with the locked tinyserve[dev,bench] and fetch the dataset

lock:  ## re-resolve tinyserve[dev,bench] in a fresh venv and write requirements.lock
	@PYTHON=$(PYTHON) LOCK=$(LOCK) bash scripts/lock.sh

data:  ## install the Debian packages in use (dataset, chromium, redis, promtool, nginx) if missing
	@bash scripts/ensure-system.sh

run: install  ## serve the bundled model and classify the samples through it (ONCE=1 to stop after)
	@VENV=$(VENV) HOST=$(HOST) PORT=$(PORT) bash scripts/run-demo.sh

test: install lint typecheck pytest  ## ruff, mypy and the whole pytest suite

lint: $(STAMP)  ## ruff check and ruff format --check
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

typecheck: $(STAMP)  ## mypy --strict on src/
	$(BIN)/mypy

pytest: $(STAMP) $(LITERT_STAMP)  ## the test suite (the LiteRT conversions in .venv-litert)
	TINYSERVE_LITERT_PYTHON=$(CURDIR)/$(LITERT_VENV)/bin/python $(BIN)/pytest -q

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests scripts benchmarks
	$(BIN)/ruff format src tests scripts benchmarks

bench-compare: install  ## tinyserve (4 bodies, 2 workers) vs FastAPI, LitServe, bare ONNX Runtime; each goal's ratio (about 40 minutes)
	$(BIN)/python benchmarks/compare_servers.py --models $(COMPARE_MODELS) --reps 3 --duration 5 \
		--out runs/compare-servers

bench: bench-compare  ## every performance check of benchmarks/RESULTS.md (about 55 minutes)
	@mkdir -p runs/bench
	$(BIN)/tinyserve bench http noop --image samples/fashion/0000_ankle-boot.png \
		--concurrency 1,8,32,64 --warmup 1 --duration 5 --json > runs/bench/loadgen-capacity.json
	$(BIN)/python benchmarks/server_cold_start.py --runs 10 | tee runs/bench/cold-start.txt
	$(BIN)/python benchmarks/large_photo_decode.py --runs 15 | tee runs/bench/large-photo.md
	$(BIN)/tinyserve bench model models/fashion-cnn --batch-sizes 1,8,32,256 --threads 1,2 \
		--json > runs/bench/engine-fashion-cnn.json
	$(BIN)/python benchmarks/serve_modes.py --rounds 3 --duration 5 | tee runs/bench/serve-modes.md

reliability: install  ## soak, overload, faults, fuzzing: the table of RESULTS.md (about 25 minutes)
	$(BIN)/python benchmarks/reliability.py --out runs/reliability

reliability-quick: install  ## the same, reduced (about 5 minutes)
	$(BIN)/python benchmarks/reliability.py --quick --out runs/reliability

ui-screenshots: install  ## every view of the web page, desktop and phone width, in runs/ui/
	$(BIN)/python scripts/ui_screenshots.py --out runs/ui

# The converter environment: exactly requirements-litert.lock (make lock writes it).
$(LITERT_STAMP): requirements-litert.lock
	@test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
		-r requirements-litert.lock
	@$(LITERT_VENV)/bin/python -m pip check || { echo "requirements-litert.lock misses a requirement: make lock" >&2; exit 1; }
	@rm -f $(LITERT_VENV)/.installed-* && touch $@

litert-env: $(LITERT_STAMP)  ## the environment `tinyserve convert litert` runs litert-torch in
	@echo "export TINYSERVE_LITERT_PYTHON=$(CURDIR)/$(LITERT_VENV)/bin/python"

clean:  ## remove the virtual environments and caches
	rm -rf $(VENV) $(LITERT_VENV) .pytest_cache .mypy_cache .ruff_cache
