# The commands the README names. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The versions every dependency is installed at (torch, triton and CUDA packages aside): `make lock`.
LOCK   ?= constraints.txt
PROTOS := $(wildcard protos/ragfleet/v1/*.proto)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv lock protos demo demo-model colbert-model test test-fast test-unit reliability bench bench-gpu lint clean

venv: $(STAMP)

# torch: the CPU build 2.13.0 unless a CUDA GPU is present; the gpu extra swaps faiss-cpu for faiss-gpu.
$(STAMP): pyproject.toml clients/python/pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch && extra=gpu; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0 && extra=cpu; \
	fi; \
	$(BIN)/python -m pip install -q -c $(LOCK) -e clients/python -e ".[$$extra,dev]"
	touch $@

# Re-pins constraints.txt to what .venv holds. To move to newer releases on purpose:
# `make clean && make venv LOCK=/dev/null && make test LOCK=/dev/null && make lock`.
lock: $(STAMP)
	{ echo "# pip constraints: the versions make venv installs (written by make lock; torch, triton and"; \
	  echo "# CUDA packages are left to the CPU or GPU install)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-)'; } > $(LOCK)

protos: $(STAMP)
	$(BIN)/python -m tools.protogen

demo: $(STAMP)
	$(BIN)/ragfleet demo

# Trains the demo's Retro model afresh and writes it where it ships (services/demo/model, committed).
demo-model: $(STAMP)
	$(BIN)/ragfleet demo --retrain --export services/demo/model

# Trains the ColBERT default afresh on SciFact's train split (../shared/data, not in a fresh clone) and
# writes it where it ships: MiniLM's top layer and the projection as a float16 delta over MiniLM.
SHARED_DATA ?= ../shared/data
colbert-model: $(STAMP)
	$(BIN)/ragfleet train colbert --beir $(SHARED_DATA)/scifact --split train --train-layers 1 \
	  --candidates 16 --batch-size 8 --steps 300 --lr 3e-3 --layer-lr 5e-5 --out .ragfleet/colbert-train \
	  --export services/retriever/colbert/shipped/ragfleet-colbert.safetensors

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not reliability"

# The inner loop: unit and integration tests, without the ones that start Ray (marked `ray`) and
# without the end-to-end demo.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not ray" tests/unit tests/integration

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# The long forms of the reliability checks (races, hostile input, amplification, faults, load, tenants);
# bounded in count and time, loopback only. -s shows the JSON summary line each check prints; the lines
# are also written to .ragfleet/reliability.jsonl (one run's).
reliability: $(STAMP)
	mkdir -p .ragfleet && rm -f .ragfleet/reliability.jsonl
	RAGFLEET_RELIABILITY_LOG=$(CURDIR)/.ragfleet/reliability.jsonl \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider -m reliability tests/reliability

bench: $(STAMP)
	$(BIN)/python -m bench.search_latency
	$(BIN)/python -m bench.retro_decode

# Kernel benchmarks against torch baselines in the same run; they need a CUDA GPU and say so without one.
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.attention
	$(BIN)/python -m bench.maxsim
	$(BIN)/python -m bench.selective_scan

lint: $(STAMP)
	$(BIN)/ruff check services ragfleet_kernels clients/python/ragfleet bench tools tests

clean:
	rm -rf $(VENV) .ragfleet
