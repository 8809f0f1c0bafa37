# jlad: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
MODELS := models/objects/1/manifest.json models/faces/1/manifest.json
CHECKPOINTS := $(wildcard checkpoints/*/model.safetensors checkpoints/*/config.json)

.PHONY: help setup models run test lint typecheck unit train-objects train-faces evaluate ablation bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build is on local disk; unpinned it would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,train,dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (service, training, tests)

# int8 calibrates on each model's training images where ../shared/data has them, else on
# scikit-image samples (CI); the manifests record which.
CALIBRATION := $(if $(wildcard $(DATA)/caltech101),--calibration objects=$(DATA)/caltech101) \
	$(if $(wildcard $(DATA)/mtfl-train),--calibration faces=$(DATA)/mtfl-train)

$(MODELS) &: $(STAMP) $(CHECKPOINTS) model_export/*.py
	$(PY) -m model_export.export --checkpoints checkpoints --out models $(CALIBRATION)

models: $(MODELS)  ## export the committed checkpoints to ONNX under models/

run: setup models  ## run the service on its defaults (http://127.0.0.1:8000/docs)
	$(PY) -m service

lint:  $(STAMP) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check service client model_export tests bench

typecheck: $(STAMP)  ## mypy on service/ and the client
	$(BIN)/mypy

unit: setup models  ## pytest only
	$(BIN)/pytest -q

test: setup models lint typecheck  ## everything CI runs: lint, types, tests
	$(BIN)/pytest -q

train-objects: setup  ## train the default `objects` model (DATA=path to the data sets)
	$(PY) -m model_export.train --config configs/objects.yaml --data $(DATA)/caltech101 --out checkpoints/objects

train-faces: setup  ## train the default `faces` model (160 px recipe, 224 px stages, W_D at the zoom)
	$(PY) -m model_export.train --config configs/faces.yaml --data $(DATA)/mtfl-train --out runs/faces_160
	$(PY) -m model_export.train --config configs/faces_224.yaml --data $(DATA)/mtfl-train \
		--out runs/faces_224 --init runs/faces_160
	$(PY) -m model_export.train --config configs/faces_windows.yaml --data $(DATA)/mtfl-train \
		--out runs/faces_windows_1 --init runs/faces_224
	$(PY) -m model_export.train --config configs/faces_windows.yaml --data $(DATA)/mtfl-train \
		--out checkpoints/faces --init runs/faces_windows_1
	$(PY) -m model_export.mirror_pairs --checkpoint checkpoints/faces --data $(DATA)/mtfl-train --write

evaluate: setup  ## every benchmark on both default checkpoints (runs/eval/, PNG grids in docs/img/)
	$(PY) -m model_export.evaluate all --checkpoints checkpoints --data $(DATA) --out runs/eval \
		--docs-img docs/img

ablation: setup  ## the README's ablation table (objects; ~45 min on 2 CPU cores)
	$(PY) -m model_export.ablate --config configs/objects.yaml --data $(DATA) --tasks pfwillow tss \
		--scale 0.2 --variants untrained "alignment alone" "landmarks alone" "joint (the method)" \
		"joint, no sigma" \
		--threads 1 --out runs/ablation/objects

bench: setup models  ## benchmarks on this machine (see docs/BENCH.md)
	$(PY) -m bench.run_all --out runs/bench

clean:
	rm -rf models runs .pytest_cache .mypy_cache .ruff_cache
