# Two commands matter: `make quickstart` and `make test`. Both create .venv and install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: install quickstart test bench bench-small bench-spark lint services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,spark]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/persona quickstart --workspace workspace

services:
	bash .ci/services.sh

test: install services
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: install services
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_training.py
	cd benchmarks && ../$(BIN)/python bench_serving.py
	cd benchmarks && ../$(BIN)/python bench_user_tower.py
	cd benchmarks && ../$(BIN)/python bench_online.py
	cd benchmarks && ../$(BIN)/python bench_long_histories.py
	cd benchmarks && ../$(BIN)/python bench_zh_search.py
	cd benchmarks && ../$(BIN)/python bench_ann.py
	cd benchmarks && ../$(BIN)/python bench_redis_size.py
	cd benchmarks && ../$(BIN)/python bench_recall_refresh.py
	cd benchmarks && ../$(BIN)/python bench_rank_catalogue.py

# The spark profile at two log sizes (long: about 15 minutes for the build's 1M and 3M, 17 for the jobs',
# and about 30 for training from the shards).
bench-spark: install services
	cd benchmarks && ../$(BIN)/python bench_spark_build.py 1000000 3000000
	cd benchmarks && ../$(BIN)/python bench_spark_jobs.py 200000 1000000
	cd benchmarks && ../$(BIN)/python bench_shard_training.py 200000 1000000

# The same benchmarks at a smaller size, into benchmarks/small-run/ (compare two runs with
# benchmarks/compare_runs.py; run_small.sh also takes another checkout, for a before/after pair).
bench-small: install services
	bash benchmarks/run_small.sh . benchmarks/small-run

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf workspace .pytest_cache
