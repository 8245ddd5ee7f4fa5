# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned (override with `make test TORCH=torch==2.6.0`), and the
# pin is kept as a pip constraint for everything after it, so that no dependency can pull a
# multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.safespec-installed
PYTEST_ARGS ?=

.PHONY: all install demo test bench clean
all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# The demo's data set ships in a package whose TensorFlow dependency serves only its own
	# loader; safespec reads the data files directly, so the dependency is skipped.
	$(PIP) install -q --no-deps "animal-mnist==0.4"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safespec demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench

clean:
	rm -rf $(VENV) out .pytest_cache
