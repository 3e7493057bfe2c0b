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

.PHONY: install install-dev demo serve test lint bench gpu-wheels gpu-check clean

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

# What the demo, generate and serve need: torch, then daguerre with its runtime dependencies
# and the content pipeline's (the watermark, content credentials: configs/jobs/catalog.yaml).
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[s3,marks,credentials]"
	# The real CLIP BPE vocab ships in this wheel; its own deps would replace torch.
	$(PIP) --no-deps open_clip_torch==3.3.0
	# The invisible watermark's library; its own deps would add opencv-python's GUI build.
	$(PIP) --no-deps invisible-watermark==0.2.0
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

# The wheels a bare GPU machine lacks for benchmarks/gpu_check.sh (CPython 3.12, x86-64
# manylinux, no deps resolved there): the engine's stack at the versions installed here,
# and this project. Fails when they would not travel (60 MiB).
GPU_WHEELS ?= .whl
GPU_PYTHON ?= 3.12
GPU_WHEELS_MAX_MIB ?= 60
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) benchmarks/gpu_wheels.py > $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any \
		-d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	@mib=$$(du -cm $(GPU_WHEELS)/*.whl | tail -1 | cut -f1); \
	echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS)/*.whl | wc -l) wheels, $$mib MiB"; \
	if [ $$mib -gt $(GPU_WHEELS_MAX_MIB) ]; then \
		echo "make gpu-wheels: $$mib MiB of wheels is over the $(GPU_WHEELS_MAX_MIB) MiB that may travel"; exit 2; fi

# Every GPU claim in one command (on a CPU machine: the CPU-runnable part, the rest skipped
# with reasons). On a bare GPU machine: carry .whl and run `bash benchmarks/gpu_check.sh`.
gpu-check: install-dev
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) output .pytest_cache $(GPU_WHEELS)
