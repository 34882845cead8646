# make test   -> create/update .venv with a Python >= 3.12, install pinned deps, run the CPU suite.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-gpu lint format clean demo

$(STAMP): setup.py constraints.txt scripts/find_python.sh
	@if [ -x "$(PY)" ] && ! "$(PY)" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
		echo "$(VENV) has Python < 3.12; recreating it"; rm -rf "$(VENV)"; fi
	@if [ ! -x "$(PY)" ]; then \
		py=$$(scripts/find_python.sh) || exit 1; \
		echo "creating $(VENV) with $$py"; "$$py" -m venv "$(VENV)"; fi
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,science]'
	@touch $(STAMP)

venv: $(STAMP)

# CPU suite: no GPU, gloo for multi-rank tests, torch.compile off (no inductor C++ builds on CI).
test: $(STAMP)
	TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m "not gpu" --durations=25 tests $(PYTEST_ARGS)

# GPU-only tests (run on the lent H200).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The embedded default: a tiny Olmo-Hybrid trained on this machine's Python stdlib sources.
demo: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m megatron_hybrid.demo
