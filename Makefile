# distcrond — two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
BIND ?= 127.0.0.1:8080
STATE_DIR ?= var/state
PYTEST_ARGS ?=
CHAOS_SECONDS ?= 90
CHAOS_SEED ?= 1
CHAOS_BOUND_SLACK ?= 0

.PHONY: run test unit integration lint typecheck bench chaos check-config clean venv services services-stop cluster

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

## run: start a standalone peer on the example jobs, API on http://$(BIND)/api/v1/
run: venv
	@mkdir -p $(STATE_DIR)
	@echo "distcrond: standalone peer on deploy/examples; API on http://$(BIND)/api/v1/jobs"
	@echo "  try: $(BIN)/distcronctl --url http://$(BIND) jobs    (Ctrl-C stops the peer)"
	exec $(BIN)/distcrond --jobs-dir deploy/examples/jobs.d --nodes-dir deploy/examples/nodes.d \
		--state-dir $(STATE_DIR) --bind $(BIND) --peer-id $${DISTCRON_PEER_ID:-local}

## test: lint, type-check, unit tests, then integration tests against real processes
test: venv lint typecheck unit integration

lint: venv
	$(BIN)/ruff check distcrond tests integration
	$(BIN)/ruff format --check distcrond tests integration

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest tests -m "not zookeeper and not elasticsearch" $(PYTEST_ARGS)

# Everything that starts real processes: integration/, and the contract suites'
# parameters for the real backends (tests/contract/, marked zookeeper or elasticsearch).
integration: venv
	$(BIN)/python -m pytest integration tests/contract --ignore=integration/bench \
		-m "integration or zookeeper or elasticsearch" $(PYTEST_ARGS)

## bench: performance figures against a baseline measured in the same run (prints, never fails):
##   the standalone benchmark, the cluster one (its own ZooKeeper on 2381-2383, 3 peers), then
##   the SSH one (its own sshd on 127.0.0.5:2522), then the Elasticsearch one (its own node on 9450)
bench: venv
	$(BIN)/python -m integration.bench.standalone; status=$$?; \
	BENCH_OUT=$${BENCH_OUT:+$${BENCH_OUT%.json}-cluster.json} \
		$(BIN)/python -m integration.bench.cluster || status=$$?; \
	BENCH_OUT=$${BENCH_OUT:+$${BENCH_OUT%.json}-ssh.json} \
		$(BIN)/python -m integration.bench.ssh || status=$$?; \
	BENCH_OUT=$${BENCH_OUT:+$${BENCH_OUT%.json}-es.json} \
		$(BIN)/python -m integration.bench.es || status=$$?; \
	exit $$status

## chaos: the chaos suite (integration/chaos/): three peers on their own ZooKeeper ensemble,
##   Elasticsearch and sshd hosts, about 30 one-second jobs, random faults (CHAOS_SEED) for
##   CHAOS_SECONDS; prints a table per fault kind and the invariants, fails on any violation
chaos: venv
	$(BIN)/python -m integration.chaos --seconds $(CHAOS_SECONDS) --seed $(CHAOS_SEED) \
		--bound-slack $(CHAOS_BOUND_SLACK)

## services: a local 3-server ZooKeeper ensemble on 127.0.0.1:2181-2183 (Debian's package) and a
##   single-node Elasticsearch on 127.0.0.1:9200 (Maven Central's integ-test-zip, through mvn)
services: venv
	$(BIN)/python deploy/services/zookeeper.py start
	$(BIN)/python deploy/services/elasticsearch.py start

services-stop: venv
	$(BIN)/python deploy/services/elasticsearch.py stop; status=$$?; \
	$(BIN)/python deploy/services/zookeeper.py stop || status=$$?; exit $$status

## cluster: three peers on the examples against that ensemble, APIs on 127.0.0.1:8081-8083
cluster: services
	exec $(BIN)/python deploy/cluster.py

check-config: venv
	$(BIN)/distcrond --check --jobs-dir deploy/examples/jobs.d --nodes-dir deploy/examples/nodes.d

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
