# streamer: every developer and CI task goes through these targets.
#   make demo   set up, start the local broker, run the service on sample images, print predictions
#   make test   set up and run the whole suite (unit + integration against a real broker)

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system-deps kafka-up kafka-down test test-unit demo lint bench chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Debian packages the tests use: kcat (interop test) and prometheus/promtool (observability).
system-deps:
	deploy/install-system-deps

kafka-up:
	deploy/kafka/kafkactl up

kafka-down:
	deploy/kafka/kafkactl down

test: setup system-deps
	$(BIN)/pytest -m "not chaos and not bench" $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

demo: setup
	deploy/demo

lint: setup
	$(BIN)/ruff check streamer tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache results
