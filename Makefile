# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned (override with `make test TORCH=torch==2.6.0`), and the
# pin is kept as a pip constraint for everything after it, so that no dependency can pull a
# multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
RUN_STAMP := $(VENV)/.safespec-installed-run
STAMP  := $(VENV)/.safespec-installed
PYTEST_ARGS ?=

.PHONY: all install demo lint test bench clean fashion-mnist
all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# What `make demo` needs (torch, safespec, the demo's data set), and on top of it what the tests, lint and
# bench need (the dev extra, the other worlds' data). A newcomer's first run waits for the first only.
$(RUN_STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e .
	# The demo's data set ships in a package whose TensorFlow dependency serves only its own
	# loader; safespec reads the data files directly, so the dependency is skipped.
	$(PIP) install -q --no-deps "animal-mnist==0.4"
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev,mlflow]"
	$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

# The other worlds' data (bench and tests only): Fashion-MNIST (MIT). No PyPI package ships its files;
# Debian's dataset-fashion-mnist does, and its files are unpacked into the venv (no root, nothing installed
# system-wide): the test split for the second world, the training split for the tuning world. A machine
# without apt gets a note; the tests that need the files then skip.
FASHION_DEB ?= dataset-fashion-mnist=0.0~git20200523.55506a9-1
FASHION_DIR := $(VENV)/share/datasets/fashion-mnist

fashion-mnist: | $(PY)
	@if [ -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ] && [ -f $(FASHION_DIR)/train-labels-idx1-ubyte.gz ]; then \
	  exit 0; \
	elif ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
	  echo "note: no apt-get/dpkg-deb here: Fashion-MNIST (the second world, bench and tests only) not installed"; \
	else \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	  { apt-get download -q "$(FASHION_DEB)" 2>/dev/null || \
	    { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download -q "$(FASHION_DEB)"; }; } && \
	  dpkg-deb -x dataset-fashion-mnist_*.deb root && cd - >/dev/null && mkdir -p $(FASHION_DIR) && \
	  cp "$$tmp"/root/usr/share/datasets/fashion-mnist/*-ubyte.gz $(FASHION_DIR)/; \
	fi

install: $(STAMP)

demo: $(RUN_STAMP)
	$(VENV)/bin/safespec demo

# lint and types first (seconds): a finding fails the build before the tests run
lint: $(STAMP)
	$(VENV)/bin/ruff check safespec bench
	$(VENV)/bin/ruff format --check safespec bench tests
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench

clean:
	rm -rf $(VENV) out .pytest_cache
