# Two entry points (see README): `make demo` and `make test`. Each creates the virtual
# environment if it is missing, installs torch/triton and this package with every extra (extension
# built, no build isolation: isolation would reinstall ~5 GB of torch into a temporary env), then
# runs. torch and triton are pinned here for reproducible CI; pyproject.toml only sets lower bounds.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
# Installed before the package: torch (and ninja, setuptools, wheel) are needed to BUILD it.
# torchvision (needed by timm, of the distill extra) is pinned to the build of this torch, so
# that resolving the extras can never replace torch.
BUILD_DEPS := torch==2.14.1 triton==3.8.0 torchvision==0.29.1 ninja setuptools wheel
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install bench clean

demo: install
	$(PY) python/demo.py

test: install
	$(PY) -m pytest tests -q -ra

bench: install
	$(PY) -m riformer_kernels.benchmarks --arch s12 --res 224

install: $(VENV)/.installed

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)
	touch $@

# Rebuilt when a C++/CUDA source, setup.py or pyproject.toml changes. [all] brings the rest
# (numpy, matplotlib, tqdm, pytest) so that every test runs, none is skipped for a missing extra.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q -e '.[all]' --no-build-isolation
	touch $@

clean:
	rm -rf build *.egg-info riformer_kernels/_C*.so
