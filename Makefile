# `make demo` and `make test` each create or refresh .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test venv fixtures family-fixtures mediapipe-fixtures fixtures-venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# The project with its [tflite-runtime] extra (numpy<2), installed as a user would, in its own environment:
# for the backend-equivalence test and a whole run with that backend.
TFLITE_STAMP := .venv-tflite/.installed
$(TFLITE_STAMP): pyproject.toml
	test -x .venv-tflite/bin/python || $(PYTHON) -m venv .venv-tflite
	.venv-tflite/bin/python -m pip install -q --disable-pip-version-check -e '.[tflite-runtime]'
	touch $(TFLITE_STAMP)

test: $(STAMP) $(TFLITE_STAMP)
	$(BIN)/python -m pytest -q

# Throughput (SSD and YOLO models) and memory (2k vs 20k images): this job vs the Ray Data recipe vs the naive loop vs the limit; ~8 min.
bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/listing_memory.py

# Regenerate the committed fixture models (needs TensorFlow; ~15 min on 2 cores for the SSDs, then
# family-fixtures, whose TF1-order SSD is re-exported from shapes_ssd_float32.tflite).
fixtures: fixtures-venv
	PYTHONPATH=. .venv-fixtures/bin/python tools/make_fixture_models.py --out models/
	$(MAKE) family-fixtures

# Only the YOLOv8 (float32, int8), YOLOv5 and TF1-order SSD fixtures (~7 min on 2 cores), then the check.
family-fixtures: fixtures-venv
	PYTHONPATH=. .venv-fixtures/bin/python tools/make_family_models.py --out models/
	PYTHONPATH=. $(BIN)/python tools/check_fixture_models.py

# The MediaPipe-shaped fixtures (no training: seconds).
mediapipe-fixtures: fixtures-venv
	PYTHONPATH=. .venv-fixtures/bin/python tools/make_mediapipe_models.py --out models/

fixtures-venv:
	test -x .venv-fixtures/bin/python || $(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/python -m pip install -q -e '.[fixtures]'

clean:
	rm -rf demo-output .pytest_cache
