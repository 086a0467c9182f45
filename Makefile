# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test

.PHONY: demo test venv bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo:
	$(MAKE) venv EXTRAS=test
	$(PY) examples/quickstart.py

test:
	$(MAKE) venv EXTRAS=test
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench:
	$(MAKE) venv EXTRAS=test
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
