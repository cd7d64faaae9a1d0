#!/usr/bin/env bash
# Creates .venv and installs rft-bench (editable) with its test tools. Idempotent.
# On x86_64 it pins torch 2.14.1 / torchvision 0.29.1 first, so that no other torch is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    if [ "$(uname -m)" = "x86_64" ]; then
        .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    else
        .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1
    fi
fi
.venv/bin/pip install -q -e '.[test]'
