# cam-plugin — the two commands of the README do all the set-up on a fresh machine:
#   make demo   installs what the demo needs, then explains the bundled photos
#   make test   installs everything, then runs ruff, mypy, pytest and mkdocs --strict
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/cam-plugin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
export NO_MKDOCS_2_WARNING := 1
export MPLBACKEND := Agg
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD := 1

.PHONY: help demo test test-core lint typecheck pytest docs bench bench-evaluate bench-wsol compare wheel clean

help:
	@echo "make demo    - install (torch CPU, timm, demo data) and write CAM pictures to outputs/"
	@echo "make test    - install everything, then ruff, mypy, pytest, mkdocs build --strict"
	@echo "make test-core - the torch-only core tests (tests/core) on the demo venv, in minutes"
	@echo "make bench / bench-wsol / compare - benchmarks (see docs/)"

# -- environments -------------------------------------------------------------------------
# base: venv + the pinned CPU torch + torchvision with the CPU shim (../shared/ENVIRONMENT.md)
$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 numpy
	$(PIP) torchvision==0.28.0
	$(BIN)/python tools/install_torchvision_shim.py
	touch $@

# demo: only what the demo needs
$(VENV)/.demo: $(VENV)/.base pyproject.toml
	$(PIP) -e ".[demo]"
	touch $@

# test: everything, including the OpenMMLab stack (full mmcv is built once into $(CACHE))
$(VENV)/.test: $(VENV)/.demo pyproject.toml
	$(PIP) "setuptools>=68" wheel
	$(PIP) -e ".[timm,demo,captum,onnx,docs,test]"
	$(PIP) "lightning>=2.2,<3" tensorboard
# transformers (the [hf] extra) pinned below 4.52: newer ones break `import mmpretrain.models`
# (OFA imports GenerationMixin from transformers.modeling_utils; >= 4.56 BLIP too), see
# ../shared/ENVIRONMENT.md "transformers next to mmpretrain"
	$(PIP) "transformers>=4.40,<4.52"
	$(PIP) torchcam grad-cam
# cam-plugin run / evaluate (the [run] extra) and its Ray engine (the [ray] extra)
	$(PIP) "pyarrow>=14" "zarr>=3" "pycocotools>=2"
	$(PIP) "ray[data]>=2.9,<3"
	$(PIP) addict pyyaml rich termcolor yapf opencv-python-headless einops importlib-metadata \
	    mat4py modelindex pycocotools scipy shapely six terminaltables
	tools/build_mmcv_wheel.sh $(CACHE)
	$(PIP) --no-deps mmengine==0.10.7 $$(ls $(CACHE)/wheels/mmcv-2.1.0-*.whl) mmpretrain==1.2.0 mmdet==3.3.0 mmaction2==1.2.0
	touch $@

# -- the README's two commands -------------------------------------------------------------
demo: $(VENV)/.demo
	$(BIN)/cam-plugin explain --out outputs

test: $(VENV)/.test
	$(MAKE) lint typecheck pytest docs

# the core tests need only the demo venv (torch, no timm, no mmcv build): green in minutes
test-core: $(VENV)/.demo
	$(PIP) pytest
	$(BIN)/pytest -q tests/core

lint:
	$(BIN)/ruff check cam_plugin integrations tests benchmarks tools
	$(BIN)/ruff format --check cam_plugin integrations tests benchmarks tools

typecheck:
	$(BIN)/mypy cam_plugin integrations

pytest:
	$(BIN)/pytest -q --durations=20

docs:
	$(BIN)/mkdocs build --strict -q

# speed + memory vs plain forward, torchcam, grad-cam, Captum; writes docs/benchmarks.md
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.speed

# boxes per map vs raw OpenCV, faithfulness metrics vs torchcam / grad-cam; writes
# docs/benchmarks-evaluate.md
bench-evaluate: $(VENV)/.test
	$(BIN)/python benchmarks/boxes.py

# WSOL on cluttered digits: converted timm backbone, CAM vs GMP / Gaussian / brightness,
# Choe et al.'s metrics, fixed steps and seeds; writes docs/wsol.md and docs/assets/wsol/
bench-wsol: $(VENV)/.test
	$(BIN)/python benchmarks/wsol_digits.py

# the scoreboard: CAM vs grad-cam / Captum / baselines, every faithfulness and localization
# metric and time per image; writes docs/cam-vs-others.md, the figures of docs/cam-vs-captum.md,
# the bridge table of docs/captum.md and benchmarks/results/compare.json
compare: $(VENV)/.test
	$(BIN)/python -m benchmarks.compare

wheel: $(VENV)/.test
	$(BIN)/python -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) site dist build outputs *.egg-info
