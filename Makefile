# The two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv if missing and install pinned dependencies (constraints.txt pins torch==2.13.0,
# the CPU wheel, so no CUDA wheel is ever pulled).
PY ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every unreachable mirror folder; keep the log readable.
QUIET := 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint chromium venv bench-venv bench-venv-new

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 $(QUIET)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' $(QUIET)
	touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: $(STAMP)
	$(BIN)/rlhfkit demo $(ARGS)

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

# TRL's last PPO trainer (trl 1.12.0) for bench/ppo_vs_trl.py and bench/sft_rm_vs_trl.py, kept out of
# the project's own environment.
bench-venv:
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q -c constraints.txt torch==2.13.0 $(QUIET)
	.venv-bench/bin/pip install -q -c constraints.txt -e . trl==1.12.0 $(QUIET)

# The newest TRL (1.16.0: GRPOTrainer, RLOOTrainer; no PPO any more) for bench/grpo_vs_trl.py.
bench-venv-new:
	test -x .venv-bench-new/bin/python || $(PY) -m venv .venv-bench-new
	.venv-bench-new/bin/pip install -q -c constraints.txt torch==2.13.0 $(QUIET)
	.venv-bench-new/bin/pip install -q -c constraints.txt -e . trl==1.16.0 $(QUIET)
