VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench chaos systemd-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# .venv with the project and its test extra installed, nothing run.
venv: $(STAMP)

test: lint
	$(PY) -m pytest -q

# Three example videos on two simulated ComfyUI servers, then the same on one server.
demo: $(STAMP)
	rm -rf var/demo
	$(PY) daemon.py --simulate --compare-single --state-dir var/demo examples/prompts/*
	$(PY) submit.py report --state-dir var/demo -o var/demo/timeline.html

# ruff, then mypy over the files listed in pyproject.toml [tool.mypy].
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Benchmarks and the long crash run: minutes each, never part of `make test`.
bench: $(STAMP)
	$(PY) bench/core.py
	$(PY) bench/drop_to_batch.py
	$(PY) bench/makespan.py
	$(PY) bench/overhead.py
	$(PY) bench/faults.py

chaos: $(STAMP)
	$(PY) bench/chaos.py --kills 300 --server-kills 20 --seed 3

# deploy/comfy-dual.service under a real systemd: boots a Debian 12 container with
# systemd-nspawn (needs root, systemd-container and debootstrap; ~2.5 min, the Debian root
# is cached in ~/.cache/comfy-dual). Exit 77: no container can boot here. Not in `make test`.
systemd-check: $(STAMP)
	$(PY) deploy/systemd_check.py $(CHECK_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis .mypy_cache
