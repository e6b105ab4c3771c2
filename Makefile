# Set-up and main commands. `make run` and `make test` create .venv on first use, and rebuild it
# when the dependency pins change or its interpreter is missing or broken.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extras to install: `make run EXTRAS=test,cuda` installs jax for CUDA 12 GPUs (also cuda13, tpu)
EXTRAS ?= test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
STUDY ?= runs/isoflop-tiny
CACHE := $(or $(FAMJAX_CACHE),$(HOME)/.cache/famjax)
LIBTPU_PIN := $(shell sed -n 's/^ *\(libtpu==[0-9.]*\) *$$/\1/p' setup.cfg)
TPU_LIB := build/libtpu

.PHONY: run test check test-hf bench lint venv clean clean-cache

venv:
	@$(PY) -c "import famjax" 2>/dev/null || rm -rf $(VENV)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The tiny IsoFLOP study (training, fits, report, plots) on the embedded corpus; rerunning
# resumes it and skips finished runs.
run: venv
	$(PY) -m experiments.isoflop --config=experiments/configs/isoflop.py:tiny --outdir=$(STUDY)

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
$(TPU_LIB)/.installed: setup.cfg
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
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Removes famjax's cache: token files and XLA's compiled programs ($FAMJAX_CACHE, else
# ~/.cache/famjax); both are rebuilt on the next run.
clean-cache:
	rm -rf $(CACHE)
