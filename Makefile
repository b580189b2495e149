# make demo : create .venv, install, train + test ProtoNet on Omniglot 5-way 1-shot (<= 5 min on 2 CPU cores)
# make test : create .venv, install with the test extra, lint and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED := $(abspath ../shared/data)
DEMO   := recipes/configs/omniglot/protonet_5w1s_demo.yaml

# Real data shipped beside the checkout (read-only in CI); caches go to ~/.cache/lightning_mtl or $LIGHTNING_MTL_CACHE.
ifneq ($(wildcard $(SHARED)/omniglot),)
export LIGHTNING_MTL_DATA ?= $(SHARED)
endif

.PHONY: install install-test demo test lint bench learn2learn clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: install
	$(PY) recipes/fewshot.py fit  --config $(DEMO)
	$(PY) recipes/fewshot.py test --config $(DEMO) --ckpt_path best

lint: install-test
	$(PY) -m ruff check lightning_mtl datamodules recipes tests

test: install-test lint
	$(PY) -m pytest -q

bench: install
	$(PY) recipes/benchmarks/fewshot_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
