# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install torch first, so nothing later resolves torch to
# another build. On a machine without an NVIDIA driver torch comes from PyTorch's CPU index
# when that index answers (no multi-GB CUDA wheels); otherwise, and on GPU machines, from the
# default index. Override with `make TORCH_INDEX=https://download.pytorch.org/whl/cu128 ...`
# (or TORCH_INDEX= for the default index), and TORCH=torch==X for another version.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu/
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || $(PYTHON) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)', timeout=3)" >/dev/null 2>&1 && echo $(CPU_INDEX))
PIP := PYTHONWARNINGS=ignore $(PY) -m pip install -q
RUN_STAMP := $(VENV)/.daguerre-run
DEV_STAMP := $(VENV)/.daguerre-dev
PYTEST_ARGS ?=

.PHONY: install install-dev demo serve test lint bench clean

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

# What the demo, generate and serve need: torch, then daguerre with its runtime dependencies.
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[s3]"
	# The real CLIP BPE vocab ships in this wheel; its own deps would replace torch.
	$(PIP) --no-deps open_clip_torch==3.3.0
	touch $(RUN_STAMP)

# The test toolchain on top: pytest, the S3 server, ONNX Runtime, Triton, the OpenAI client.
$(DEV_STAMP): $(RUN_STAMP) pyproject.toml
	$(PIP) -e ".[dev]"
	touch $(DEV_STAMP)

demo: install
	$(VENV)/bin/daguerre demo

serve: install
	$(VENV)/bin/daguerre serve

test: install-dev
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install-dev
	$(PY) benchmarks/pipeline_efficiency.py --images 256 --json benchmarks/results/pipeline_efficiency.json
	$(PY) benchmarks/serve_load.py --clients 1,2,4,8,16 --seconds 30 --json benchmarks/results/serve_load.json

clean:
	rm -rf $(VENV) output .pytest_cache
