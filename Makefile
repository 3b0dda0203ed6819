# The course's commands. Every target sets up .venv first (torch pinned first: a CPU build; then the rest).
PY      := .venv/bin/python
LINTED  := $(wildcard utils tests benchmarks solutions)  # solutions/: the code learners read (ruff reads .ipynb)
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
ARGS    ?=

.PHONY: lab test browser test-literal classroom grade notebooks execute bench data pretrain doctor lint clean-venv

$(STAMP): pyproject.toml
	@echo "setting up .venv: PyTorch (CPU build) first, then the pinned packages (a few minutes, once)"
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	@echo "[1/2] $(TORCH)"
	$(PY) -m pip install -q $(TORCH)
	@echo "[2/2] the course's pinned packages (pyproject.toml: transformers, peft, bitsandbytes, ..., test tools)"
	$(PY) -m pip install -q -e ".[test,classroom]"
	touch $(STAMP)

lab: $(STAMP)  ## open the course in JupyterLab (headless: make lab ARGS="--no-browser")
	$(PY) -m ipykernel install --user --name finetuning-course --display-name "Python (fine-tuning course)" >/dev/null
	$(PY) -m jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

NBVAL   := -m pytest -q -n 2 --dist loadfile --nbval-lax --nbval-current-env -p no:cacheprovider

test: $(STAMP) browser  ## lint, unit, consistency and browser tests, every notebook with its student copy's exercises
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m pytest tests -q -rfEs -n 2 --dist loadfile
	$(PY) -m utils.workbook --nbtest  # each solution, with its student copy's exercise cells run inside it
	$(PY) $(NBVAL) .nbtest

browser:  ## Chromium and CJK fonts for tests/test_browser.py (Debian/Ubuntu as root; elsewhere it says what to do)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and fonts-noto-cjk for the browser test (about a minute)"; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; \
	else echo "no chromium: tests/test_browser.py will be skipped (install Debian's chromium and fonts-noto-cjk)"; fi

test-literal: $(STAMP)  ## every solution and every student copy executed as a file of its own (twice the time)
	$(PY) $(NBVAL) solutions notebooks

notebooks: $(STAMP)  ## regenerate notebooks/ from solutions/ (and refresh every notebook's header cells)
	$(PY) -m utils.workbook

execute: $(STAMP)  ## run every solution notebook in place, so its committed outputs are current
	$(PY) -m utils.workbook --execute $(NB)

classroom: $(STAMP)  ## an nbgrader course in classroom/ from solutions/ (then: cd classroom && nbgrader ...)
	$(PY) -m utils.classroom classroom
	@echo "nbgrader runs from the course's .venv: export PATH=$(CURDIR)/.venv/bin:\$$PATH"

grade: $(STAMP)  ## grade submissions without nbgrader: make grade ARGS="submissions/"
	$(PY) -m utils.grade $(ARGS)

bench: $(STAMP)  ## benchmarks; writes benchmarks/RESULTS.md
	$(PY) -m benchmarks.run

data: $(STAMP)  ## regenerate the world's data files (deterministic)
	$(PY) -m utils.data

pretrain: $(STAMP)  ## retrain the tiny base model (about 20 minutes on 2 CPU cores)
	$(PY) -m utils.pretrain

doctor: $(STAMP)  ## what is installed, which device, what to fix
	$(PY) -m utils.doctor

lint: $(STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

clean-venv:
	rm -rf .venv
