#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent machine that has PyTorch but no package index and none of
# this project's pure-Python dependencies that its image lacks (open_clip_torch, ftfy, wcwidth, submitit).
#
#   scripts/gpu-check-device.sh wheels        # here, with the package index: those wheels into .whl/ (ignored)
#   scripts/gpu-check-device.sh run [ARGS]    # there: install .whl/ into /tmp/site, run the check, write $OUT
#
# One device call (the `device` tool; .whl and data/embedded carried, so nothing is fetched or drawn there):
#   run(command="bash scripts/gpu-check-device.sh run", carry=[".whl", "data/embedded"], timeout_s=540)
# It writes $OUT/gpu_check.json and $OUT/gpu_check.log (the printed tables); docs/PERFORMANCE.md records them.
# `run --cpu` is the same path at tiny sizes on a CPU (tests/test_gpu_check.py runs the --cpu check itself).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pure-Python wheels (py3-none-any), the versions this project is tested with; their own needs (regex, tqdm,
# huggingface_hub, safetensors, timm, cloudpickle, typing_extensions) are in the lent machines' image.
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 submitit==1.5.4)

case "${1:-}" in
wheels)
    # for the lent machines: x86-64 and CPython 3.12 (wcwidth ships an abi3 binary wheel)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
run)
    shift
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH}" PYTHONUNBUFFERED=1
    out="${OUT:-.}"
    { command -v nvidia-smi >/dev/null && nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__)'; } || true
    python3 benchmarks/gpu_check.py --root data --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
    ;;
*)
    echo "usage: $0 wheels | run [gpu_check.py arguments]" >&2
    exit 2
    ;;
esac
