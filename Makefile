# The two commands of the quick start. Both set up .venv first (idempotent).
.PHONY: setup quickstart test test-slow test-all gpu-check

setup:
	./scripts/setup.sh

# The main job on the embedded default: the quick start sweep, then its table.
quickstart: setup
	.venv/bin/bench sweep sweeps/quickstart.yaml
	.venv/bin/bench table --runs runs/quickstart --metric id,ood_avg,zs_avg

# The default test suite (what CI runs).
test: setup
	.venv/bin/python -m pytest -q

# The tests marked slow only.
test-slow: setup
	.venv/bin/python -m pytest -q -m slow

# Everything, slow tests included.
test-all: setup
	.venv/bin/python -m pytest -q -m ''

# Speed on the CUDA device present (docs/PERFORMANCE.md, "GPU check"); says so and exits 0 without one.
gpu-check: setup
	.venv/bin/python benchmarks/gpu_check.py --out gpu_check.json
