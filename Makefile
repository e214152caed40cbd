# Two entry points: `make demo` (toy world end to end) and `make test`.
# `setup` is idempotent: it reinstalls only when requirements.txt changes (stamp keyed on its hash).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
TOY_DIR ?= data/toyworld
PYTEST_ARGS ?=

.PHONY: setup test demo toyworld clean

setup: $(STAMP)

# The venv takes about 6 GB (torch's CUDA build): say so up front rather than let pip fail with ENOSPC midway.
$(STAMP): requirements.txt
	@$(PYTHON) -c "import shutil; gb = shutil.disk_usage('.').free / 1e9; gb < 7 and print(f'warning: {gb:.1f} GB free here; installing requirements.txt into $(VENV) needs about 7 GB')"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

# `make test` runs the whole suite, the toy learning tests included (the shared toy pretraining and the
# fine-tunes on it). Skip those (marked `slow`) for a quick pass: make test TEST_MARKS="not slow".
TEST_MARKS ?=
test: setup
	$(PY) -m pytest -x -q $(if $(TEST_MARKS),-m "$(TEST_MARKS)") $(PYTEST_ARGS)

toyworld: setup
	$(PY) -m dataset.toyworld --out $(TOY_DIR) --seed 0

demo: setup
	$(PY) demo.py --toy-dir $(TOY_DIR)

clean:
	rm -rf output/toy_demo
