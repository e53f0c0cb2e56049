#!/usr/bin/env bash
# train.compile (configs/smollm2/) runs torch.compile, whose CPU backend builds C++: make sure g++ exists,
# installing Debian's when we can. Not fatal: without a compiler everything but train.compile works, and a run
# that asks for it says so before it starts.
set -euo pipefail

if command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then
    echo "C++ compiler found"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ (train.compile: torch.compile's CPU backend)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    exit 0
fi
echo "warning: no C++ compiler; runs with train.compile: true (configs/smollm2/) need one, e.g." \
     "'sudo apt-get install g++', or --set train.compile=false" >&2
