# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install torch first (a CPU build where one is at hand),
# so nothing later resolves torch to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.daguerre-installed
PYTEST_ARGS ?=

.PHONY: install demo serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The real CLIP BPE vocab ships in this wheel; its own deps would replace torch.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/daguerre demo

serve: install
	$(VENV)/bin/daguerre serve

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/pipeline_efficiency.py --images 256 --json benchmarks/results/pipeline_efficiency.json
	$(PY) benchmarks/serve_load.py --clients 1,2,4,8,16 --seconds 30 --json benchmarks/results/serve_load.json

clean:
	rm -rf $(VENV) output .pytest_cache
