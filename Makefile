# edtools: `make demo` (the main job on the bundled demo data) and `make test` (the whole suite).
# Both create .venv on first use. torch is installed first, pinned to the local CPU wheel, so nothing
# pulls a multi-GB CUDA build here; on Colab the notebook's install cell keeps the preinstalled torch.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
DEMO := demo
PYTEST_ARGS ?=

.PHONY: demo test test-colab test-quick lint format bench browser-deps screenshots readme-settings clean venv

venv: $(STAMP)

# pyproject.toml is the one list of dependencies: extras train, notebook and dev.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,notebook,dev]"
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
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-colab

# Colab's own package stack (constraints/colab.txt: ipywidgets 7.7.1, numpy 2.0, transformers 4.57, the oldest
# diffusers/accelerate/peft edtools declares) in a second environment: the panels and the notebook headless, and
# model folders written by either environment read by the other (test_folder_compat).
COLAB_VENV := .venv-colab
$(COLAB_VENV)/.installed: pyproject.toml constraints/colab.txt
	test -x $(COLAB_VENV)/bin/python || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COLAB_VENV)/bin/python -c "import torch" 2>/dev/null || $(COLAB_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(COLAB_VENV)/bin/python -m pip install --quiet -c constraints/colab.txt -e ".[train,notebook,dev]"
	touch $@

test-colab: $(COLAB_VENV)/.installed
	$(COLAB_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_widgets.py tests/test_notebook.py tests/test_install.py \
		tests/test_folder_compat.py

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

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
