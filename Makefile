# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

# One stamp per set of extras: `base` is runmap alone, `test` adds everything the suite uses.
# The "compat" editable install is a path in a .pth file: the default one imports a finder
# (pathlib, re, urllib...) at the start of every interpreter, ~25 ms of each replica's start.
# setuptools warns that this mode is transitional; the warning is silenced, not the install.
$(VENV)/.installed-%: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Compat editable installs" \
	  $(PY) -m pip install --quiet -e ".$(if $(filter base,$*),,[$*])" --config-settings editable_mode=compat
	touch $@

demo: $(VENV)/.installed-base
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-test
	scripts/install-test-tools.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The side-by-side run, then the sections on clusters (placed Mapper, SSH tunnel, three Ray nodes),
# each of which rewrites its own part of docs/benchmarks.md. The SSH ones start the test sshd hosts.
bench: $(VENV)/.installed-test
	scripts/install-test-tools.sh
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/remote_mapper.py
	$(PY) benchmarks/ssh_tunnel.py
	$(PY) benchmarks/ray_three_nodes.py

clean:
	rm -rf $(VENV) build *.egg-info
