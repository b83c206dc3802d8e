# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench report clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ivp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	@for b in gateway_overhead upload ingest replay_vs_generate; do \
		echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

# Heavy (hours on 2 cores; not in CI): both full verification runs, resumable from
# REPORT_CACHE; they regenerate docs/VERIFICATION.md and the raw figures in docs/img.
REPORT_CACHE ?= $(HOME)/.cache/ivp/report
report: $(STAMP)
	nice -n 19 $(BIN)/ivp verify-report --model tiny --checkpoint $(REPORT_CACHE)/tiny
	nice -n 19 $(BIN)/ivp verify-report --model gemma-3-270m --checkpoint $(REPORT_CACHE)/gemma

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
