# Everything from nothing on a fresh Debian / Python 3.11 machine: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench report clean

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

# Every figure of the model card (the lab's commands; the developer datasets in ../shared/data; the unseen sets
# of `apt install invesalius-examples mricron-data` are used where installed): held-out figures at 128 px and at
# each scan's own size, with the U-Net peer beside the model, then unknown-scan and healthy-brain figures.
WEIGHTS ?= VLDUN/Resources/Models/vldun_compact.safetensors
BASELINE ?= lab/models/unet_baseline.safetensors
DATA ?= $(wildcard ../shared/data/Dataset00[1-4]_*)
report: $(STAMP)
	$(VENV)/bin/vldun evaluate --data $(DATA) --weights $(WEIGHTS) --baseline $(BASELINE) --out report/size128
	$(VENV)/bin/vldun evaluate --data $(DATA) --weights $(WEIGHTS) --baseline $(BASELINE) --size 0 --out report/native
	$(VENV)/bin/vldun calibrate-ood --data $(DATA) --weights $(WEIGHTS) --unseen --json report/unknown_scans.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache report
