# hotbed — `make demo` to see it work, `make test` to prove it.
# Both install what they need on a Debian 12 host (as root): docker.io, gVisor's runsc,
# redis-server, mmdebstrap, busybox-static, then a Python venv in .venv.

PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
HOTBED  ?= .venv/bin/hotbed
PYTEST_ARGS ?=
BENCH_ARGS ?=
SESSIONS_ARGS ?=

.PHONY: help install host venv images image test-image demo test test-cluster lint bench bench-start bench-scale \
	bench-scale-claims bench-scale-cluster bench-fleet bench-exec bench-exec-ptrace bench-node bench-verify fuzz install-service clean

help:
	@echo "make demo     install everything, build the image, start hotbed, run sandboxes"
	@echo "make test     install everything and run the test suite (real Redis, dockerd + runsc)"
	@echo "make test-cluster  the spine, templates and exec tests on a local Redis Cluster"
	@echo "make lint     ruff + mypy"
	@echo "make bench    all benchmarks, one results file each (bench-start, bench-scale, ...)"
	@echo "make fuzz     random and mutated messages on every stream for 60 s (FUZZ_S=...)"

install: host venv

host:
	bash scripts/host-setup.sh

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,swerex]'
	touch $@

test-image: install
	@docker image inspect hotbed/busybox >/dev/null 2>&1 || $(HOTBED) image build busybox

image: install
	$(HOTBED) image build base

images: test-image image

demo: images
	$(HOTBED) up --detach
	$(PY) -m hotbed.demo

test: images
	$(PY) -m pytest $(PYTEST_ARGS)

# The same tests against a local 3-primary Redis Cluster (tests/conftest.py starts it);
# CLUSTER_TESTS=tests runs the whole suite that way.
CLUSTER_TESTS ?= tests/test_sandbox_lifecycle.py tests/test_templates.py tests/test_exec.py \
	tests/test_batching.py tests/test_records.py tests/test_tenants.py \
	tests/test_operations.py::test_redis_acl_user_confined_to_its_prefix
test-cluster: images
	HOTBED_TEST_CLUSTER=1 $(PY) -m pytest $(CLUSTER_TESTS) $(PYTEST_ARGS)

lint: venv
	.venv/bin/ruff check hotbed daemon cli scheduler workers bench tests
	.venv/bin/mypy

# Every results file under bench/results/ is written whole by one of these targets
# (bench/README.md lists which); BENCH_ARGS adds options, e.g. BENCH_ARGS='--phases cost
# --out /tmp/cost.json'. The run records the target, its argv and the git commit.
bench: bench-start bench-scale bench-scale-claims bench-exec bench-exec-ptrace

bench-start: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench start $(BENCH_ARGS)

bench-scale: install
	$(PIP) install -q -e '.[bench]'
	BENCH_MAKE_TARGET=$@ $(PY) -m bench scale $(BENCH_ARGS)

# Warm claims held 10 s per step (the scale run's claims steps are 3 s). The pool of
# 110,000 takes the scheduler about 140 s to fill on a 2-core box.
bench-scale-claims: install
	BENCH_MAKE_TARGET=$@ $(PY) -m bench scale --phases claims --claim-rates 5000,6000 \
		--claim-step-s 10 --fill-max-s 200 --out bench/results/scale-claims-10s.json $(BENCH_ARGS)

# The throughput and claims phases on a local Redis Cluster (3 primaries x 1 replica).
bench-scale-cluster: install
	BENCH_MAKE_TARGET=$@ $(PY) -m bench scale --cluster $(BENCH_ARGS)

# 3 nodes (a dockerd each) on a local Redis Cluster: snapshots copied between nodes, a
# primary failover under load, claims through the cluster against a standalone Redis.
bench-fleet: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench fleet $(BENCH_ARGS)

bench-exec: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench exec $(BENCH_ARGS)

# The same on gVisor's ptrace platform (the runsc-ptrace runtime host-setup registers).
bench-exec-ptrace: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench exec --oci-runtime runsc-ptrace \
		--out bench/results/exec-ptrace.json $(BENCH_ARGS)

# A real node (runsc, every role on this box): bench/node.py's phases (burst, density,
# throughput, faults; BENCH_ARGS='--phase density --density-max 200' runs one phase,
# smaller), then the sessions phase (auto-pause), which adds its section to the same
# bench/results/node.json. The results file keeps the sections of phases not run.
bench-node: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench node $(BENCH_ARGS)
	BENCH_MAKE_TARGET=$@ $(PY) -m bench node_sessions $(SESSIONS_ARGS)

# Hostile input on every stream and a sandbox's guest channel, bounded in time: no
# daemon may exit and no valid request interleaved with it may fail
# (bench/results/fuzz.json). FUZZ_S sets the duration.
FUZZ_S ?= 60
fuzz: images
	BENCH_MAKE_TARGET=$@ $(PY) -m bench fuzz --duration $(FUZZ_S) $(BENCH_ARGS)

# Which run wrote each results file; fails for a file edited or merged by hand.
bench-verify: venv
	$(PY) -m bench verify

# systemd units + /etc/hotbed configs for this checkout's venv (hotbed service install).
install-service: venv
	$(HOTBED) service install

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
