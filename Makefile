# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create ./.venv when it is missing. Override TORCH for another torch build, e.g.
#   make test TORCH='torch torchvision --index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch first: BasicSR's setup.py imports torch, so it is built without build isolation
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mambair-demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

# the benchmarks of the README (long: the full scan benchmark alone takes ~40 min on 2 cores)
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_scan.py --threads 1 2
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_tiles.py
	$(BIN)/python benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
