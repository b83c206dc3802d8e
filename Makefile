# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM lives in its own environment: it pins transformers and numpy versions of its own
# (scripts/install-vllm.sh); `ivp server --engine vllm` runs there, the rest here.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test screenshots lint bench report clean sysdeps vllm

# Debian packages (swtpm, the TPM2 TSS, iproute2, nftables, bubblewrap): quick when
# installed.
sysdeps:
	@scripts/system-deps.sh

$(STAMP): pyproject.toml scripts/system-deps.sh
	scripts/system-deps.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the TPM bindings build against the TSS libraries, where they are installed
	if pkg-config --exists tss2-esys 2>/dev/null; then \
		$(BIN)/pip install --quiet -e '.[dev,tpm]'; \
	else $(BIN)/pip install --quiet -e '.[dev]'; fi
	touch $(STAMP)

$(VLLM_STAMP): scripts/install-vllm.sh
	bash scripts/install-vllm.sh $(PY) $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/ivp demo

test: sysdeps $(STAMP) $(VLLM_STAMP)
	bash scripts/install-browser.sh
	$(BIN)/python -m pytest -q

# The console's pictures in docs/img/ (docs/CONSOLE.md), taken by its browser tests.
screenshots: $(STAMP)
	bash scripts/install-browser.sh
	IVP_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q -s tests/test_console_browser.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	@for b in gateway_overhead upload ingest replay_vs_generate streaming; do \
		echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

# Heavy (hours on 2 cores; not in CI): both full verification runs, resumable from
# REPORT_CACHE; they regenerate docs/VERIFICATION.md and the raw figures in docs/img.
REPORT_CACHE ?= $(HOME)/.cache/ivp/report
report: $(STAMP)
	nice -n 19 $(BIN)/ivp verify-report --model tiny --checkpoint $(REPORT_CACHE)/tiny
	nice -n 19 $(BIN)/ivp verify-report --model gemma-3-270m --checkpoint $(REPORT_CACHE)/gemma

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build src/*.egg-info
