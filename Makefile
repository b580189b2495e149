# make demo : create .venv, install, train + test ProtoNet on Omniglot 5-way 1-shot (<= 5 min on 2 CPU cores)
# make test : create .venv, install with the test extra and learn2learn (parity tests), lint and run the test suite
# make learn2learn : build learn2learn 0.2.0 from its sdist with a current Cython and install it into .venv
# make benchmarks : the CPU benchmarks into runs/benchmarks/ (about 30 min on 2 CPU cores), then the generated docs
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED := $(abspath ../shared/data)
DEMO   := recipes/configs/omniglot/protonet_5w1s_demo.yaml

# Real data shipped beside the checkout (read-only in CI); caches go to ~/.cache/lightning_mtl or $LIGHTNING_MTL_CACHE.
ifneq ($(wildcard $(SHARED)/omniglot),)
export LIGHTNING_MTL_DATA ?= $(SHARED)
endif

.PHONY: install install-test demo test lint bench benchmarks learn2learn clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# learn2learn's sdist does not build on Python 3.11+ as shipped: .ci/learn2learn.sh regenerates its C files
$(VENV)/.learn2learn: .ci/learn2learn.sh $(VENV)/.runtime
	PYTHON=$(PY) bash .ci/learn2learn.sh
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test
learn2learn: $(VENV)/.learn2learn

demo: install
	$(PY) recipes/fewshot.py fit  --config $(DEMO)
	$(PY) recipes/fewshot.py test --config $(DEMO) --ckpt_path best

lint: install-test
	$(PY) -m ruff check lightning_mtl datamodules recipes tests

test: install-test lint learn2learn
	LIGHTNING_MTL_REQUIRE_LEARN2LEARN=1 $(PY) -m pytest -q

bench: install
	$(PY) recipes/benchmarks/fewshot_throughput.py

# each writes its command, commit, hardware and tables into runs/benchmarks/<name>.json; report.py renders them into
# docs/benchmarks.md and the README's speed rows (run it on an otherwise idle machine: the ratios are within-run, the
# absolute times are not)
BENCH := runs/benchmarks
benchmarks: install-test learn2learn
	$(PY) recipes/benchmarks/fewshot_throughput.py --steps 50 --warmup 10 --repeats 2 --precision 32 bf16-mixed \
		--json $(BENCH)/fewshot_throughput.json
	$(PY) recipes/benchmarks/mtl_overhead.py --tasks 4 50 --methods equal uncertainty famo pcgrad mgda upgrad \
		--torchjd upgrad mgda --architectures --libmtl --steps 25 --warmup 5 --repeats 2 --threads 2 \
		--json $(BENCH)/mtl_overhead_methods.json
	$(PY) recipes/benchmarks/mtl_overhead.py --tasks 4 --backbone conv4 --hidden 32 --batch-size 32 \
		--methods equal pcgrad --torchjd --libmtl equal pcgrad --repeats 3 --threads 2 \
		--json $(BENCH)/mtl_overhead_architectures.json
	$(PY) recipes/benchmarks/dense_step.py --precisions 32-true bf16-mixed --steps 3 --warmup 1 --threads 2 \
		--json $(BENCH)/dense_step.json
	$(PY) recipes/benchmarks/soak.py --episodes 10000 --workers 4 --json $(BENCH)/soak.json
	$(PY) recipes/report.py runs --readme README.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
