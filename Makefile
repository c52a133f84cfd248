# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything once (torch first, pinned to the CPU wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.toucan-installed

.PHONY: install demo test test-fast browser clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[deepspeed,edge,test]'
	# GPTQModel builds against the torch already installed, so no build isolation
	# (an isolated build env would fetch the newest torch, a multi-GB CUDA wheel).
	$(PIP) install -q setuptools wheel
	$(PIP) install --no-build-isolation 'gptqmodel==7.6.*'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium drives the Gradio page in the browser test (no browser download);
# the CJK font makes Chinese text legible in its screenshots.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! dpkg -s fonts-wqy-microhei >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver fonts-wqy-microhei; \
	  else echo "missing: run 'sudo apt-get install chromium chromium-driver fonts-wqy-microhei'"; fi; fi

demo: install
	$(VENV)/bin/toucan demo

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
