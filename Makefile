# Set-up and main commands. `make run` and `make test` create .venv on first use, and rebuild it
# when the dependency pins change or its interpreter is missing or broken.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extras to install: `make run EXTRAS=test,cuda` installs jax for CUDA 12 GPUs (also cuda13, tpu)
EXTRAS ?= test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# the exact versions `make` installs (setup.cfg holds the ranges a pip install accepts)
LOCK := requirements-lock.txt
STUDY ?= runs/isoflop-tiny
CACHE := $(or $(FAMJAX_CACHE),$(HOME)/.cache/famjax)
LIBTPU_PIN := $(shell sed -n 's/^\(libtpu==[0-9.]*\)$$/\1/p' $(LOCK))
TPU_LIB := build/libtpu

.PHONY: run test check test-hf bench lint venv clean clean-cache lock check-floors check-install dist notebooks

venv:
	@$(PY) -c "import famjax" 2>/dev/null || rm -rf $(VENV)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The tiny IsoFLOP study (training, fits, report, plots) on the embedded corpus; rerunning
# resumes it and skips finished runs.
run: venv
	$(VENV)/bin/famjax study --config=tiny --outdir=$(STUDY)

# Two workers, one test file each at a time, so that a file's compiled fixtures are built once.
# `make test`: every test but the statistical and end-to-end ones (marked slow), for each change.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" \
	  --ignore=tests/hf/test_hf_live.py --ignore=tests/hardware/test_tpu.py tests

# `make check`: the whole suite, notebooks and the second XLA code path included (CI runs it),
# with its 20 slowest tests listed; then the TPU compiler's tests with libtpu (Linux x86-64 only)
check: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 \
	  --ignore=tests/hf/test_hf_live.py --ignore=tests/hardware/test_tpu.py tests
	@if [ "$$(uname -sm)" = "Linux x86_64" ]; then \
	  $(MAKE) --no-print-directory $(TPU_LIB)/.installed && \
	  PYTHONPATH=$(CURDIR)/$(TPU_LIB) JAX_PLATFORMS=cpu $(PY) -m pytest -q -rs tests/hardware/test_tpu.py; \
	else echo "tests/hardware/test_tpu.py not run: libtpu is built for Linux x86-64 only"; fi

# libtpu alone, at the tpu extra's pin, beside .venv and on the path of the TPU tests only: in
# .venv it would make every JAX start probe for a TPU (a second and a page of warnings each)
$(TPU_LIB)/.installed: $(LOCK)
	rm -rf $(TPU_LIB)
	$(PY) -m pip install -q --no-deps --target $(TPU_LIB) '$(LIBTPU_PIN)'
	touch $@

# `make test-hf`: exports and fixtures against transformers itself (installs the hf extra:
# transformers and the CPU torch wheel)
test-hf:
	$(MAKE) --no-print-directory venv EXTRAS=test,hf
	$(PY) -m pytest -q -s tests/hf/test_hf_live.py

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/fit_speed.py

# Removes the environment and build files only: runs/ (checkpoints, studies) is never touched,
# nor famjax's cache of token files and compiled programs (`make clean-cache`).
clean:
	rm -rf $(VENV) $(FLOORS) .pytest_cache build dist *.egg-info

# Removes famjax's cache: token files and XLA's compiled programs ($FAMJAX_CACHE, else
# ~/.cache/famjax); both are rebuilt on the next run.
clean-cache:
	rm -rf $(CACHE)

# requirements-lock.txt anew from setup.cfg's ranges (uv; versions already locked are kept unless
# the ranges exclude them: `make lock UPGRADE=--upgrade` takes the newest). Python 3.11, Linux
# x86-64, every CPU extra and tpu; torch's CUDA packages are left out (make installs the CPU wheel).
CUDA_ONLY := cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
  nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand \
  nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink \
  nvidia-nvshmem-cu13 nvidia-nvtx triton
lock: venv
	$(PY) -m pip install -q 'uv>=0.9'
	head -3 $(LOCK) > $(LOCK).head
	tail -n +4 $(LOCK) > $(LOCK).body  # uv keeps what its output file already holds
	$(VENV)/bin/uv pip compile setup.cfg $(UPGRADE) --extra test --extra hf --extra eval \
	  --extra wandb --extra profile --extra tpu --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_31 --no-header --no-annotate \
	  $(foreach p,$(CUDA_ONLY),--no-emit-package $(p)) -o $(LOCK).body
	cat $(LOCK).head $(LOCK).body > $(LOCK) && rm $(LOCK).head $(LOCK).body

# The fast tier in .venv-floors: every dependency at the oldest release setup.cfg allows (uv's
# lowest-direct resolution; the test tools at their floors too). docs/install.md has its times.
FLOORS := .venv-floors
check-floors: venv
	$(PY) -m pip install -q 'uv>=0.9'
	test -x $(FLOORS)/bin/python || $(VENV)/bin/uv venv -q --python $(PY) $(FLOORS)
	$(VENV)/bin/uv pip install -q --python $(FLOORS)/bin/python --resolution lowest-direct \
	  -e '.[test]'
	$(VENV)/bin/uv pip list --python $(FLOORS)/bin/python | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy) '
	$(FLOORS)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" \
	  --ignore=tests/hf/test_hf_live.py --ignore=tests/hardware/test_tpu.py tests

# A user's install from the wheel (tests/support/install_check.sh): an environment's own jax, jaxlib
# and numpy kept; the famjax command's study and fit from an empty directory; notebook 02.
check-install: dist
	PYTHON=$(PYTHON) bash tests/support/install_check.sh

# The notebooks run top to bottom in colab/ and saved with their outputs, as GitHub shows them.
notebooks: venv
	$(PY) tests/support/notebooks.py

# A wheel and an sdist in dist/, checked by twine (the wheel holds famjax only).
dist: venv
	rm -rf dist
	$(PY) -m build --sdist --wheel --outdir dist .
	$(PY) -m twine check --strict dist/*
