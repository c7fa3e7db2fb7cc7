# otel_ctxbridge: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# In CI the C accelerator must build: a compile error fails the install instead of falling
# back to pure Python (which a newcomer without a compiler gets, with a warning).
REQUIRE_EXTENSIONS := $(if $(filter true,$(CI)),OTEL_CTXBRIDGE_REQUIRE_EXTENSIONS=1)

.PHONY: venv test test-versions lint typecheck pytest bench demo clean

$(STAMP): pyproject.toml hatch_build.py otel_ctxbridge/_speedups.c $(wildcard otel_ctxbridge/_speedups_*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(REQUIRE_EXTENSIONS) $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict otel_ctxbridge benchmarks

# The core store tests run twice: on the compiled accelerator, then on the pure-Python code
# that runs where no C compiler was found at install time.
PURE_PYTHON_TESTS := tests/test_store.py tests/test_store_update.py tests/test_store_cache.py \
	tests/test_storage.py tests/test_spans.py tests/test_logs.py tests/test_executors.py \
	tests/test_speedups.py tests/test_asgi.py tests/test_asgi_routes.py tests/test_scope_exit.py

pytest: $(STAMP)
	$(BIN)/pytest
	OTEL_CTXBRIDGE_NO_EXTENSIONS=1 $(BIN)/pytest -q $(PURE_PYTHON_TESTS)

test: lint typecheck pytest

# The other Python versions the package supports, where this machine has them (on PATH, or
# installed by pyenv): the whole suite, each in its own venv (with the compiled accelerator
# where a compiler is found; CI requires it). CI runs this after `make test`, and a version
# missing there fails the run, as a missing service does. The venvs are made by uv (a dev
# dependency): about 5 s each where pip takes 35 s, which keeps CI within its time limit.
OTHER_PYTHONS := 3.10 3.12 3.13

test-versions: $(STAMP)
	@for v in $(OTHER_PYTHONS); do \
	  py=$$(command -v python$$v 2>/dev/null); \
	  if [ -z "$$py" ] || ! "$$py" -c "" >/dev/null 2>&1; then \
	    py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -1); \
	  fi; \
	  if [ -z "$$py" ] && [ "$(CI)" = true ]; then echo "== Python $$v: missing (CI=true)"; exit 1; fi; \
	  if [ -z "$$py" ]; then echo "== Python $$v: not on this machine, skipped"; continue; fi; \
	  venv=.venv-$$v; echo "== Python $$v: $$py ($$venv)"; \
	  test -x $$venv/bin/python || $(BIN)/uv venv --quiet --seed --python "$$py" $$venv || exit 1; \
	  $(REQUIRE_EXTENSIONS) $(BIN)/uv pip install --quiet --python $$venv/bin/python -e '.[dev]' || exit 1; \
	  $$venv/bin/pytest -q -p no:cacheprovider || exit 1; \
	done

bench: $(STAMP)
	$(BIN)/python -m benchmarks

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .ruff_cache .pytest_cache otel_ctxbridge/_speedups.*.so
