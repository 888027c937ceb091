# Set-up and the two README commands. Every target installs what it needs from nothing.
#   make quickstart  - the main job: default corpus -> tokenizer -> tiny MoM trained on CPU -> perplexity
#   make test        - the test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
# Each venv gets its own torch-extension cache (two venvs sharing one rebuild each other's ops).
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export OMP_NUM_THREADS ?= 2
# The venv's tools first (its ninja, too: DeepSpeed rebuilds JIT ops when the ninja changes).
export PATH := $(abspath $(VENV))/bin:$(PATH)
DATA    := data/default

.PHONY: venv quickstart test clean
venv: $(VENV)/.installed
$(VENV)/.installed: requirements-cpu.txt requirements-test.txt setup.py
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, exact pin: a looser pin (or deepspeed's own torch requirement) would pull a CUDA build
	$(VPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(VPY) -m pip install -q --no-build-isolation -r requirements-cpu.txt -r requirements-test.txt
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(DATA)/corpus_summary.json: | venv
	$(VPY) -c "from mom_dist.data.corpus import write_default_corpus; print(write_default_corpus('$(DATA)/raw', 4.0))"
	$(VENV)/bin/mom-preprocess $(DATA)/raw/default_corpus.jsonl -o $(DATA)/corpus --vocab-size 1024 \
		--valid-ratio 0.02 --workers 2 --overwrite --no-progress

quickstart: venv $(DATA)/corpus_summary.json
	$(VENV)/bin/mom-train --config configs/tiny.yaml

test: venv
	$(VPY) -m pytest -q tests
