# Two commands for a newcomer (see README):
#   make book   # build the book on the default profile (PROFILE=ci|default|paper|modern)
#   make test   # run the test suite (includes executing every chapter on the ci profile)
# Both create .venv and install everything the first time.

PROFILE ?= default
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build where no GPU is present. On machines whose PyPI torch is a CUDA build and that can
# reach it, TORCH_CPU="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" is smaller.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.4
PYTEST_ARGS ?=

.PHONY: book test test-slow install bench browser clean help

help:
	@echo "make book [PROFILE=default] [FORCE=1]   execute the chapters and build _build/html"
	@echo "make test                              run the tests (CI runs exactly this)"
	@echo "make test-slow                         also the slow tests (trains the model organism)"
	@echo "make bench                             print the benchmarks"

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing $(TORCH_GPU)"; $(PY) -m pip install --quiet "$(TORCH_GPU)"; \
	else \
	  echo "No GPU: installing the CPU build, $(TORCH_CPU)"; $(PY) -m pip install --quiet $(TORCH_CPU); \
	fi
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[book,test]"
	@touch $@

book: $(STAMP)
	$(PY) -m entity_tracking.book.runner --profile $(PROFILE) $(if $(FORCE),--force)

# The browser test needs Debian's chromium; install it where we may (root with apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no chromium and no root: the browser tests will be skipped (install Debian's chromium)"; fi; }

# The tests execute the ci book, whose slowest cell takes a few minutes: a cell still running
# after 15 min is a hung kernel, and fails the chapter instead of the whole CI run's time.
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 ENTITY_TRACKING_CELL_TIMEOUT=900 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

clean:
	rm -rf _build
