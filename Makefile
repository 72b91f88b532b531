# Tally: `make run` serves the API with demo data, `make test` runs the whole suite.
# Both need only Python 3.11+ and make: the virtualenv and an embedded PostgreSQL (when
# DATABASE_URL is unset) are set up here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tally needs Python 3.11 or newer (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# make run: the API and the projector log in as tally_app, the least-privileged role
# `tally migrate` makes (migrate, seed and keys work as the owner).
run: export TALLY_APP_ROLE ?= tally_app
run: $(STAMP)
	$(BIN)/tally migrate
	$(BIN)/tally seed
	$(BIN)/tally keys dev
	TALLY_LOG_FORMAT=$${TALLY_LOG_FORMAT:-console} exec $(BIN)/tally serve --projector

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache .hypothesis
