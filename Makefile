# robustkit: every target creates .venv when missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-dev
# Keep pip quiet and offline-friendly; torch/torchvision come from the machine's wheel cache.
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: install demo test test-slow bench lint clean samples mutate docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade "pip>=23" wheel

# The project with its dev extra, then its docs extra (mkdocs-material needs a newer requests than
# torchattacks pins: one resolution of both is impossible, so pip only warns about the pin here).
# torchattacks' wheel overwrites files of the real robustbench package, so robustbench is
# reinstalled last, without dependencies.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install $(PIP_FLAGS) -e ".[dev]"
	$(PIP) install $(PIP_FLAGS) -e ".[docs]"
	$(PIP) install $(PIP_FLAGS) --force-reinstall --no-deps robustbench==1.1.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robustkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# bench_saliency, bench_srd_dat and bench_speedmap run their --quick forms here: on 2 loaded
# CPU cores the full speed map (ResNet-18 and its compile warm-ups) took an hour, and the full
# saliency benchmark's ResNet-18 part (16 images x n = 50) 21 minutes for AdaptGrad alone
# (docs/speed.md, docs/experiments.md); run them without --quick on a GPU or a quiet machine;
# bench_gpu measures the GPU map where CUDA is present and writes {"skipped": true} elsewhere.
bench: $(STAMP)
	$(PY) benchmarks/bench_attacks.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_regularisers.py
	$(PY) benchmarks/bench_saliency.py --quick
	$(PY) benchmarks/bench_srd_dat.py --quick
	$(PY) benchmarks/bench_speedmap.py --quick
	$(PY) benchmarks/bench_gpu.py

# Mutation testing of one module in a scratch copy (.mutate/<module>/): make mutate MODULE=robustkit/objectives/srd_dat.py
# [TESTS="tests/a.py tests/b.py"]; the tally lives in tests/MUTATION.md.
mutate: $(STAMP)
	@test -n "$(MODULE)" || { echo "usage: make mutate MODULE=robustkit/<path>.py [TESTS='tests/...']" >&2; exit 2; }
	$(PY) tests/mutate.py "$(MODULE)" --tests "$(TESTS)"

# The documentation site (mkdocs-material + mkdocstrings, both in the dev extra); warnings fail it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

lint: $(STAMP)
	$(VENV)/bin/ruff check robustkit tests benchmarks train evaluate

samples: $(STAMP)
	$(PY) train/prepare_samples.py

clean:
	rm -rf $(VENV) runs bench_results *.egg-info .mutate site
