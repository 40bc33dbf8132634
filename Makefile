# Two entry points (see README): `make run` (the main job) and `make test`.
# Both create the virtual environment .venv on first use, from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# JupyterLab reads packages' setting overrides from this folder of the environment; ours turns on saving the
# widget state with the notebook (why: hdkdlib/widgets.py). pip's editable install skips data files, so make
# copies it. A conda environment: `make lab-settings VENV=$CONDA_PREFIX`.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d/hdkdlib.json
NOTEBOOK_OUT ?= runs/notebooks

.PHONY: env lab-settings run test test-browser notebooks strip clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(LAB_SETTINGS): notebooks/jupyterlab-settings/hdkdlib.json
	mkdir -p $(dir $@)
	cp $< $@

lab-settings: $(LAB_SETTINGS)

env: $(STAMP) $(LAB_SETTINGS)

# Main job: every notebook with its quick default parameters, executed headlessly by papermill.
# Executed copies go to $(NOTEBOOK_OUT) (ignored by git); figures go to figures/ (ignored too).
run: env
	mkdir -p $(NOTEBOOK_OUT)
	for nb in notebooks/[0-9]*.ipynb; do \
		echo "== $$nb"; start=$$(date +%s); \
		$(PY) -m papermill --cwd notebooks "$$nb" "$(NOTEBOOK_OUT)/$$(basename $$nb)" || exit 1; \
		echo "== $$nb: $$(( $$(date +%s) - start )) s"; \
	done
	@echo "executed notebooks: $(NOTEBOOK_OUT)/   figures: figures/"

# Tests: the unit tests and every notebook under nbval (stored outputs compared where kept).
# Two worker processes (pytest-xdist), a file each at a time: a notebook's cells share one kernel, and a test
# file's module fixtures are built once.
test: env
	$(PY) -m pytest -n 2 --dist loadfile --nbval --nbval-current-env tests notebooks --ignore=tests/browser

# Notebook 06 in JupyterLab and headless Chromium (needs `apt-get install chromium chromium-driver`);
# screenshots in runs/browser/. Not part of `make test`: CI machines have no browser.
test-browser: env
	$(PY) -m pip install -q -e ".[dev,browser]"
	$(PY) -m pytest -p no:cacheprovider tests/browser

# Strip volatile outputs and widget state before committing a notebook you edited. Execution counts stay
# only on the cells whose outputs are kept (metadata keep_output): nbval needs them there.
strip: $(STAMP)
	$(VENV)/bin/nbstripout --keep-count notebooks/*.ipynb
	$(PY) -c "import sys; from hdkdlib.notebook import clear_counts_without_outputs as c; [c(p) for p in sys.argv[1:]]" notebooks/*.ipynb

clean-runs:
	rm -rf $(NOTEBOOK_OUT)
