# make demo / make test / make bench / make lint. Each sets up .venv when missing, installs torch
# (TORCH_SPEC, a CPU build by default; e.g. TORCH_SPEC=torch for a CUDA build), triton and the project
# with its test extras, and builds the compiled kernels.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test bench lint cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Rebuilt when the C++ / CUDA sources or the build files change.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet triton numpy ninja setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The searches on the embedded models (simulated LLM reasoning task, Gaussian mixture, 8x8 digits):
# tables on stdout, PNG plots in demo-output/.
demo: install
	$(VENV)/bin/fastsearch info
	$(VENV)/bin/fastsearch demo --out demo-output

# Every CUDA source must compile for $(CUDA_ARCH), GPU or not; the .cu files include no torch header.
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, CUDA sources not compiled"; exit 0; fi; \
	tmp=$$(mktemp -d); status=0; \
	for f in csrc/cuda/*.cu; do \
		[ -e "$$f" ] || continue; \
		echo "nvcc -arch=$(CUDA_ARCH) $$f"; \
		$(NVCC) -std=c++17 -O3 -arch=$(CUDA_ARCH) -Icsrc -c "$$f" -o "$$tmp/$$(basename $$f).o" || status=1; \
	done; rm -rf "$$tmp"; exit $$status

test: install cuda-check
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=median,ops,rounds
	$(VENV)/bin/fastsearch bench --dtype float32,float16,bfloat16 --csv auto

lint: install
	$(PIP) install --quiet ruff
	$(VENV)/bin/ruff check fastsearch kernels tests benchmarks

clean:
	rm -rf build *.egg-info fastsearch/_C*.so
