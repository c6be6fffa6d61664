# The two set-up commands of the README, from a fresh clone with no venv:
#   make quickstart   install the core and run the main job on scikit-learn's digits
#   make test         install everything (all extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS ?= nas,search,profile,onnx,device,dev
PYTEST_ARGS ?=

.PHONY: quickstart test install install-all lint bench-core clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools<81' wheel

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@ $(VENV)/.core

install: $(VENV)/.core
install-all: $(VENV)/.all

quickstart: $(VENV)/.core
	$(BIN)/autoexit quickstart

test: $(VENV)/.all
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.all
	$(BIN)/ruff check autoexit tests bench

bench-core: $(VENV)/.all
	$(BIN)/python bench/cifar10_resnet.py

clean:
	rm -rf $(VENV) runs .pytest_cache
