# Everything a newcomer needs: `make run` starts a local 3-node cluster,
# `make test` runs the whole suite. Both create the virtualenv and build first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvstore-installed


.PHONY: all venv build lint system-deps run test test-unit test-sim test-integration test-jepsen soak bench bench-etcd clean

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q "Cython>=3.0" "grpcio-tools>=1.60"
	$(PY) -m pip install -q -e '.[test]' --no-build-isolation
	touch $@

venv: $(STAMP)

# Regenerate protobuf code and the Cython WAL in place (cheap when up to date).
build: venv
	$(PY) setup.py -q build_proto build_ext --inplace

# System tools the tests use, from Debian's packages. As root, install the missing
# ones; otherwise the tests that need them skip with a reason.
#   iptables iproute2   Jepsen partitions (network namespaces)
#   strace fiu-utils    real fault injection (EIO on fsync, fdatasync, msync)
#   faketime            the clock nemesis
#   e2fsprogs           ext4 images on loop devices (the power nemesis)
#   prometheus          promtool and a real Prometheus for the alert tests
#   etcd-server etcd-client   the side-by-side benchmarks
#   tmux                a real terminal for the Ctrl-C test of `make run`
APT_PACKAGES := iptables iproute2 strace fiu-utils faketime e2fsprogs prometheus etcd-server etcd-client tmux
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		echo "installing: $$missing"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
		|| echo "warning: could not install $$missing; the tests that need them skip"; \
	elif [ -n "$$missing" ]; then \
		echo "warning: not root, cannot install $$missing; the tests that need them skip"; \
	fi

# RUN_ARGS: flags for `kvstore cluster up`, e.g. make run RUN_ARGS="--dir /tmp/kv --nodes 5"
run: build
	$(VENV)/bin/kvstore cluster up $(RUN_ARGS)

# ruff (pyproject's [tool.ruff]) on the whole tree, mypy (check_untyped_defs) on the package.
lint: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint system-deps
	$(PY) -m pytest tests -q

test-unit: build
	$(PY) -m pytest tests/unit -q

test-sim: build
	$(PY) -m pytest tests/sim -q

test-integration: build
	$(PY) -m pytest tests/integration -q

test-jepsen: build system-deps
	$(PY) -m pytest tests/jepsen -q

# Long runs, not part of `make test`.
soak: build
	$(PY) -m tests.sim --seeds 100000 --jobs 2
	$(PY) -m pytest tests -q -m slow

bench: build system-deps
	$(PY) benchmarks/compare_etcd.py

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache kvstore/*.so native/*.c kvstore/v1/*_pb2*.py kvstore/v1/*_pb2*.pyi
