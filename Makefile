# streamer: every developer and CI task goes through these targets.
#   make demo   set up, start the local broker, run the service on sample images, print predictions
#   make test   set up and run the whole suite (unit + integration against a real broker)

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: bench-gpu setup system-deps kafka-up kafka-down test test-unit demo lint contract bench chaos fuzz clean

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

# docs/contract/ (JSON Schemas, header tables) is generated from streamer/schemas.py;
# a unit test fails when the two drift. Run this after changing the contract.
contract: setup
	$(BIN)/python -m streamer.contract

# Benchmarks (docs/BENCHMARKS.md): results/bench-<timestamp>/ gets JSON, PNG plots, summary.md.
# `make bench` takes 15+ minutes (10-minute RSS soak); BENCH_ARGS adds flags.
BENCH_ARGS ?=
.PHONY: bench-quick

bench: setup
	deploy/kafka/kafkactl status >/dev/null 2>&1 || deploy/kafka/kafkactl up
	$(BIN)/streamer bench $(BENCH_ARGS)

# The accelerator check (issues 3 and 11): each device JPEG decoder checked against the CPU
# path, then the ceiling and the engine on CUDA, fp16, 500x375 JPEGs decoded on the GPU; no
# Kafka. Run it where a GPU is (about 2 minutes on one H200). The gpu extra brings
# nvImageCodec's nvJPEG library; on a machine without PyPI use deploy/gpu/bench-on-device.
bench-gpu: setup
	$(BIN)/pip install --quiet -e ".[gpu]"
	$(BIN)/streamer bench --gpu $(BENCH_ARGS)

bench-quick: setup
	deploy/kafka/kafkactl status >/dev/null 2>&1 || deploy/kafka/kafkactl up
	$(BIN)/streamer bench --quick $(BENCH_ARGS)

# The full chaos suite (docs/RELIABILITY.md): 10 inference-worker kills in 2,000 images, and
# the bounce tests on a local 3-broker cluster (10,000 records, instances and brokers bounced
# 3 rounds each; a rebalance storm of 10 rounds). `make test` runs the reduced form of each.
chaos: setup system-deps
	$(BIN)/pytest -m chaos -s $(PYTEST_ARGS)

# Long fuzzing of the decode entry point: new random inputs each run.
FUZZ_EXAMPLES ?= 20000
fuzz: setup
	STREAMER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/unit/test_decode.py -k never_escape \
		-o timeout=7200 $(PYTEST_ARGS)

# The fuzzer of real Kafka records (docs/RELIABILITY.md): seeded hostile records sent by
# librdkafka and kcat with every codec, the service in exactly-once mode; every record must
# get exactly one answer. `make test` runs one seed of 240; this runs FUZZ_KAFKA_SEEDS
# (comma-separated, or random:N for new ones) of FUZZ_KAFKA_RECORDS each.
FUZZ_KAFKA_SEEDS ?= 1,2,3,4,5
FUZZ_KAFKA_RECORDS ?= 2000
.PHONY: fuzz-kafka
fuzz-kafka: setup system-deps
	mkdir -p results
	STREAMER_FUZZ_KAFKA_SEEDS=$(FUZZ_KAFKA_SEEDS) STREAMER_FUZZ_KAFKA_RECORDS=$(FUZZ_KAFKA_RECORDS) \
		STREAMER_FUZZ_KAFKA_REPORT=$${STREAMER_FUZZ_KAFKA_REPORT:-results/fuzz-kafka.jsonl} \
		$(BIN)/pytest tests/integration/test_fuzz_kafka.py -s $(PYTEST_ARGS)

# The Helm chart (docs/KUBERNETES.md): lint and render every variant with the pinned Helm, which
# deploy/helm/helmctl builds into ~/.cache/streamer/helm on first use (a few minutes; needs Go).
.PHONY: helm-check
helm-check: setup
	$(BIN)/pytest tests/unit/test_helm.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache results
