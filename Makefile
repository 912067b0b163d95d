# `make demo` and `make test` each create or refresh .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test venv fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the committed fixture models (needs TensorFlow; ~15 min on 2 cores).
fixtures:
	test -x .venv-fixtures/bin/python || $(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/python -m pip install -q -e '.[fixtures]'
	PYTHONPATH=. .venv-fixtures/bin/python tools/make_fixture_models.py --out models/
	PYTHONPATH=. $(BIN)/python tools/check_fixture_models.py

clean:
	rm -rf demo-output .pytest_cache
