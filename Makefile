# One entry point for humans and CI. `make demo` and `make test` install on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export SPARK_LOCAL_IP := 127.0.0.1
export TORCH_EXTENSIONS_DIR := $(abspath .cache/torch_extensions)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned on the same line as everything else so pip keeps the CPU wheel.
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/spark-submit --master "local[*]" jobs/cluster_corpus.py --output runs/demo
	$(BIN)/python jobs/build_index.py --run runs/demo
	$(BIN)/deepspeed --num_gpus 2 train/main.py --data runs/demo --out runs/demo/model
	$(BIN)/python -m index.query --run runs/demo --model runs/demo/model/export "The Prime Minister announced a new budget for schools."

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
