# One entry point. `make serve` runs the embedded default on a real model; `make test` runs everything.
VENV := .venv/bin

.PHONY: serve test test-fast lint fix bench bench-builds bench-edge bench-docker bench-web load install install-test

install:
	scripts/bootstrap.sh demo

install-test:
	scripts/system-deps.sh
	scripts/bootstrap.sh demo,test

serve: install
	$(VENV)/llamacontroller serve $(ARGS)

# The whole suite under coverage (serve subprocesses included); the report fails below [tool.coverage.report]'s floor.
test: install-test lint
	rm -f .coverage .coverage.*
	LLAMACONTROLLER_TESTS_STRICT=$${LLAMACONTROLLER_TESTS_STRICT:-} $(VENV)/coverage run -m pytest tests $(ARGS)
	$(VENV)/coverage combine -q
	$(VENV)/coverage report --skip-covered --sort=cover

test-fast: install-test
	$(VENV)/python -m pytest tests/unit tests/http $(ARGS)

lint: install-test
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports

fix: install-test
	$(VENV)/ruff check --fix .
	$(VENV)/ruff format .

bench: install-test
	$(VENV)/python -m tests.bench.bench_lifecycle --gemma
	$(VENV)/python -m tests.bench.bench_gateway --gemma $(ARGS)
	$(VENV)/python -m tests.bench.bench_chunk_cpu

bench-builds: install-test
	$(VENV)/python -m tests.bench.bench_llama_builds --gemma $(ARGS)

bench-edge: install-test
	$(VENV)/python -m tests.bench.bench_edge $(ARGS)

bench-docker: install-test
	$(VENV)/python -m tests.bench.bench_docker --gemma $(ARGS)

bench-web: install-test
	$(VENV)/python -m tests.bench.bench_web $(ARGS)

# Load and soak runs (bounded, loopback only; not part of `make test`): prints tables, exit 1 on a missed target.
load: install-test
	$(VENV)/python -m tests.load.load $(ARGS)
