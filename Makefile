# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM lives in its own environment: it pins transformers and numpy versions of its own
# (scripts/install-vllm.sh); `ivp server --engine vllm` runs there, the rest here.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test lint bench report clean vllm

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(VLLM_STAMP): scripts/install-vllm.sh
	bash scripts/install-vllm.sh $(PY) $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/ivp demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	@for b in gateway_overhead upload ingest replay_vs_generate; do \
		echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

report: $(STAMP)
	$(BIN)/ivp verify-report

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build src/*.egg-info
