# Two entry points (see README): `make demo` and `make test`. Each creates the virtual
# environment if it is missing, installs torch/triton and this package (extension built, no
# build isolation: isolation would reinstall ~5 GB of torch into a temporary env), then runs.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
DEPS    := torch==2.14.1 triton==3.8.0 numpy pytest ninja pybind11 matplotlib tqdm
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install bench clean

demo: install
	$(PY) python/demo.py

test: install
	$(PY) -m pytest tests -q -ra

bench: install
	$(PY) -m benchmarks --arch s12 --res 224

install: $(VENV)/.installed

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	touch $@

# Rebuilt when a C++/CUDA source or setup.py changes.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q -e . --no-build-isolation
	touch $@

clean:
	rm -rf build *.egg-info riformer_kernels/_C*.so
