# make demo : create .venv, install, train + test ProtoNet on Omniglot 5-way 1-shot (<= 5 min on 2 CPU cores)
# make test : create .venv, install with the test extra and learn2learn (parity tests), lint and run the test suite
# make learn2learn : build learn2learn 0.2.0 from its sdist with a current Cython and install it into .venv
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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
