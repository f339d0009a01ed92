# edtools: `make demo` (the main job on the bundled demo data) and `make test` (the whole suite).
# Both create .venv on first use with the versions the suite passed with (constraints/tested.txt). torch is
# installed first, pinned to the local CPU wheel, so nothing pulls a multi-GB CUDA build here; on Colab the
# notebook's install cell keeps the preinstalled torch.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
DEMO := demo
PYTEST_ARGS ?=
# The tested versions: every package of the extras and their dependencies, torch aside, as `make lock` froze
# them after the suite passed. LOCKED= (empty) resolves the newest versions within pyproject's ranges instead.
LOCK := constraints/tested.txt
COLAB_LOCK := constraints/colab-tested.txt
LOCKED ?= -c $(LOCK)
COLAB_LOCKED ?= -c $(COLAB_LOCK)

.PHONY: demo test test-colab test-quick test-latest lock lint format bench browser-deps screenshots readme-settings clean venv

venv: $(STAMP)

# pyproject.toml is the one list of dependencies (extras train, notebook and dev); the lock pins their versions.
# A changed list or lock builds the environment afresh, so it holds exactly the locked set and nothing older.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(LOCKED) -e ".[train,notebook,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edtools make-demo $(DEMO)/data
	$(BIN)/edtools scan $(DEMO)/data
	$(BIN)/edtools schedule $(DEMO)/data --epochs 10 --seed 555 --batch-size 4 --resolution 512 --out $(DEMO)/schedule
	$(BIN)/edtools make-tiny-model $(DEMO)/tiny-model
	$(BIN)/edtools train --config examples/demo.yaml --data-root $(DEMO)/data --model $(DEMO)/tiny-model --out $(DEMO)/run
	@echo
	@echo "demo done: balance table above; $(DEMO)/schedule/balance.png (expected vs actual, 10 epochs);"
	@echo "           $(DEMO)/run/checkpoints (diffusers folders and single .safetensors files), $(DEMO)/run/samples (PNG grids),"
	@echo "           $(DEMO)/run/balance_actual.png (images per concept in each trained epoch),"
	@echo "           $(DEMO)/run/validation.csv and validation.png (validation loss per concept);"
	@echo "           TensorBoard: $(BIN)/tensorboard --logdir $(DEMO)/run/logs"

# Debian's chromium for the real-browser test (never a browser download); playwright comes from pip.
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "browser-deps: could not install chromium; the browser test will be skipped"; \
		else echo "browser-deps: not root, chromium not installed; the browser test will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check edtools tests bench notebooks
	$(BIN)/ruff format --check edtools tests bench notebooks

format: $(STAMP)
	$(BIN)/ruff check --fix edtools tests bench notebooks
	$(BIN)/ruff format edtools tests bench notebooks

test: $(STAMP) browser-deps lint
	# the cross-environment folder test runs once, in the Colab leg (it starts this environment's python too)
	$(if $(LOCKED),EDTOOLS_LOCK=$(LOCK)) $(BIN)/python -m pytest --ignore=tests/test_folder_compat.py $(PYTEST_ARGS)
	$(MAKE) test-colab

# Colab's own package stack (constraints/colab.txt: ipywidgets 7.7.1, numpy 2.0, transformers 4.57, the oldest
# diffusers/accelerate/peft edtools declares) in a second environment: the panels and the notebook headless, and
# model folders written by either environment read by the other (test_folder_compat).
COLAB_VENV := .venv-colab
$(COLAB_VENV)/.installed: pyproject.toml constraints/colab.txt $(COLAB_LOCK)
	rm -rf $(COLAB_VENV) && $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COLAB_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(COLAB_VENV)/bin/python -m pip install --quiet -c constraints/colab.txt $(COLAB_LOCKED) -e ".[train,notebook,dev]"
	touch $@

test-colab: $(STAMP) $(COLAB_VENV)/.installed
	$(if $(COLAB_LOCKED),EDTOOLS_LOCK=$(COLAB_LOCK)) $(COLAB_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_widgets.py tests/test_notebook.py tests/test_install.py tests/test_folder_compat.py

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

# The newest releases within pyproject's ranges, in their own environment, through the quick suite: a breaking
# upstream release shows here before it reaches users. Not part of `make test` (CI stays on the tested set).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install --quiet -e ".[train,notebook,dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -Ei '^(diffusers|transformers|accelerate|peft|bitsandbytes|huggingface.hub|ipywidgets|numpy)=='
	$(LATEST_VENV)/bin/python -m pytest -p no:cacheprovider -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

# pip freeze less torch (the local CPU wheel here, Colab's CUDA build there), under a line saying what it is.
freeze = { echo "\# The versions $(2) passed with, written by make lock on $$(date -u +%F) (Python \
$$($(1) -c 'import platform; print(platform.python_version())'), $$(uname -m)). torch is left out."; \
	$(1) -m pip freeze --exclude-editable | grep -v '^torch=='; }

# Refresh the tested versions: both environments built afresh from the newest releases (Colab's from what Colab
# keeps, constraints/colab.txt), the whole of `make test` run, and only when it passes both locks written.
lock:
	rm -f $(STAMP) $(COLAB_VENV)/.installed
	$(MAKE) test LOCKED= COLAB_LOCKED=
	$(call freeze,$(BIN)/python,the suite (make test)) > $(LOCK).new
	$(call freeze,$(COLAB_VENV)/bin/python,the Colab leg (make test-colab on constraints/colab.txt)) > $(COLAB_LOCK).new
	mv $(LOCK).new $(LOCK) && mv $(COLAB_LOCK).new $(COLAB_LOCK)
	touch $(STAMP) $(COLAB_VENV)/.installed
	@echo "lock: $(LOCK) and $(COLAB_LOCK) hold the versions the suite passed with; commit them"

# Real screenshots of the notebook panels in chromium, written to docs/.
screenshots: $(STAMP) browser-deps
	EDTOOLS_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_browser.py

bench: $(STAMP)
	$(BIN)/python bench/schedule.py
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/optimizer_memory.py

# The README's settings table, generated from TrainConfig's fields.
readme-settings: $(STAMP)
	$(BIN)/python -c "import re, pathlib; from edtools.flags import settings_table; \
	p = pathlib.Path('README.md'); s = p.read_text(); \
	p.write_text(re.sub(r'(?s)<!-- settings -->.*<!-- /settings -->', lambda m: '<!-- settings -->\n' + settings_table() + '\n<!-- /settings -->', s))"

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache .hypothesis
