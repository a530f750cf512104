# Two commands from a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-t2i test bench clean

venv: $(STAMP)

# torch first, from the pinned build, then the project under a constraint file so no
# dependency can swap torch/torchvision for another build (see README "Environment").
$(STAMP): pyproject.toml constraints.txt setup.py tessera/bpe/_core.cpp
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/tessera run --config configs/demo.yaml

# the demo with text -> image in its budget (~48 min on 2 cores; README "Learning", "Text -> image", items 7-10)
demo-t2i: venv
	$(BIN)/tessera run --config configs/demo-t2i.yaml

test: venv
	$(BIN)/python -m pytest -q --durations=20 tests

bench: venv
	$(BIN)/python benchmarks/bench_prepare.py

clean:
	rm -rf runs .pytest_cache
