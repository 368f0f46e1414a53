# Everything from nothing on a fresh Debian / Python 3.11 machine: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch/torchvision are pinned exactly: these two builds lie on the project machines' disk,
# any other pin downloads gigabytes. The lab (training, evaluation) installs beside the product.
$(STAMP): pyproject.toml lab/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test,demo]'
	$(PY) -m pip install -e lab
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vldun demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/vldun benchmark --json bench.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache
