# Two entry points for a newcomer: `make demo` (main job on the embedded default) and `make test`.
# Both bootstrap a local virtualenv in $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch is installed before the package so pip never resolves the open range in pyproject.toml
# to the newest CUDA wheels; on a GPU machine override it, e.g. `make TORCH_SPEC="torch==2.13.0" ...` from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all

.PHONY: install demo test clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py --output_dir demo-output

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) demo-output .pytest_cache
