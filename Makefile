# hotbed — `make demo` to see it work, `make test` to prove it.
# Both install what they need on a Debian 12 host (as root): docker.io, gVisor's runsc,
# redis-server, mmdebstrap, busybox-static, then a Python venv in .venv.

PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
HOTBED  ?= .venv/bin/hotbed
PYTEST_ARGS ?=

.PHONY: help install host venv images image test-image demo test lint bench bench-start bench-scale bench-exec install-service clean

help:
	@echo "make demo     install everything, build the image, start hotbed, run sandboxes"
	@echo "make test     install everything and run the test suite (real Redis, dockerd + runsc)"
	@echo "make lint     ruff + mypy"
	@echo "make bench    all benchmarks (bench-start, bench-scale, bench-exec)"

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

lint: venv
	.venv/bin/ruff check hotbed daemon cli scheduler workers bench tests
	.venv/bin/mypy

bench: bench-start bench-scale bench-exec

bench-start: images
	$(PY) -m bench start

bench-scale: install
	$(PIP) install -q -e '.[bench]'
	$(PY) -m bench scale

bench-exec: images
	$(PY) -m bench exec

# systemd units + /etc/hotbed configs for this checkout's venv (hotbed service install).
install-service: venv
	$(HOTBED) service install

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
