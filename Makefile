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

# Every figure of the model card (the lab's commands; the five developer datasets in ../shared/data; the unseen
# sets of `apt install invesalius-examples mricron-data` are used where installed): held-out figures at 128 px and
# at each scan's own size, then unknown-scan and healthy-brain figures. BASELINE=runs/unet_baseline/model.safetensors
# (from `vldun train recipes/unet_baseline.yaml`) puts the joint U-Net's figures beside the model's.
WEIGHTS ?= VLDUN/Resources/Models/vldun_compact.safetensors
BASELINE ?=
DATA ?= $(wildcard ../shared/data/Dataset00[1-47]_*)
PEER = $(if $(BASELINE),--baseline $(BASELINE))
report: $(STAMP)
	$(VENV)/bin/vldun evaluate --data $(DATA) --weights $(WEIGHTS) $(PEER) --out report/size128
	$(VENV)/bin/vldun evaluate --data $(DATA) --weights $(WEIGHTS) $(PEER) --size 0 --out report/native
	$(VENV)/bin/vldun calibrate-ood --data $(DATA) --weights $(WEIGHTS) --unseen --json report/unknown_scans.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache report
