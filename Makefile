# Every target does its own set-up: `make train` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
PYTEST_WORKERS ?= 2

.PHONY: setup setup-dev train test test-all bench lint clean tpu gpu-compile gpu-deps

# `setup` is what running needs; `setup-dev` adds the test tools and the reference
# implementations (pytest, ruff, transformers, torch), so `make train` does not wait for them.
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# Re-installs only when pyproject.toml changes; the package itself is editable.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e . > $(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	$(PY) -c "import llama_jax, jax, flax, optax, orbax.checkpoint, grain, sentencepiece"
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]' > $(VENV)/pip-dev.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip-dev.log; exit 1; }
	touch $(DEV_STAMP)

train: setup
	$(PY) -m llama_jax.cli train configs/default.yaml $(if $(RUN_DIR),run_dir=$(RUN_DIR),)

# `make test` leaves out the tests marked slow (paths that faster tests cover too);
# `make test-all` runs every test.
test: setup-dev
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" --durations=25 tests

test-all: setup-dev
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

# The fixed bench-small model on one CPU device, then sharded over 8 simulated devices, then
# the default run's model with its input pipeline (python_docs) measured too.
bench: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(PY) -m llama_jax.cli bench configs/bench-small.yaml
	$(PY) -m llama_jax.cli bench configs/bench-small.yaml mesh.fsdp=8
	$(PY) -m llama_jax.cli bench configs/default.yaml --pipeline --steps 5

# libtpu (the version this JAX's tpu extra pins) beside the environment, not in it: only
# `--topology` compiles load it, so ordinary runs never probe for a TPU.
tpu: setup
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu "$$($(PY) -m llama_jax.topology)" \
	  2>&1 | grep -v "is ignored" || true
	test -d $(VENV)/libtpu/libtpu

# JAX's CUDA plugin (built for this jaxlib) beside the environment, not in it: only
# `--topology h100` (and other GPU) compiles load it; no CUDA libraries or driver are needed.
gpu-compile: setup
	$(PY) -m pip install -q --no-deps --target $(VENV)/cuda-plugin $$($(PY) -m llama_jax.gpu_target) \
	  2>&1 | grep -v "is ignored" || true
	test -d $(VENV)/cuda-plugin/jax_plugins

# The pure-Python packages the GPU machine's image lacks (it has jax, flax, optax, orbax, torch
# and transformers), for `scripts/gpu_bench.sh`, which puts this folder on PYTHONPATH: made
# here, carried there (the device tool's `carry`).
GPU_DEPS ?= .gpu_deps
gpu-deps:
	$(PYTHON) -m pip install -q --no-deps --upgrade --target $(GPU_DEPS) "omegaconf==2.4.0" \
	  2>&1 | grep -v -e "is ignored" -e "as the 'root' user" || true
	test -f $(GPU_DEPS)/omegaconf/__init__.py

lint: setup-dev
	$(VENV)/bin/ruff check llama_jax tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
