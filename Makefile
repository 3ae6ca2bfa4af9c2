# Every target that needs the environment depends on $(STAMP), so `make demo` and `make test` each work
# on a fresh machine as the only command. The stamp is rebuilt when the declared dependencies change.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch pair that lies on this workplace's disk (see ../shared/DATA.md); override on other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,data,train,serve,agents,plot,volumes

.PHONY: venv demo test lint wheel clean

# stardist ships a fluorescence image with its nuclei masks; its own imports need TensorFlow, which
# medplib never imports, so it is installed without dependencies (../shared/DATA.md).
$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps 'stardist>=0.9'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medplib demo --out demo-output

# Formatting too, Python blocks of the Markdown files included.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The browser tests drive Debian's chromium (Playwright cannot download its own browsers offline); a
# missing browser fails them, so it is installed here (the machines run as root).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get install -y chromium || (apt-get update && apt-get install -y chromium)

# lint-imports keeps DESIGN.md's layers (pyproject.toml's [tool.importlinter]); a broken contract fails.
test: lint $(CHROMIUM)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

wheel: $(STAMP)
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf build dist *.egg-info demo-output .pytest_cache .ruff_cache
