# Every target sets up its own environment: a fresh clone needs only Python >= 3.11 and make.
PYTHON ?= python3
# Another interpreter gets a venv of its own: make test PYTHON=python3.12 -> .venv-python3.12.
ifeq ($(PYTHON),python3)
VENV ?= .venv
else
VENV ?= .venv-$(notdir $(PYTHON))
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-examples test-syftbox test-syft-flwr compare-syft-flwr chaos fuzz bench bench-large lint typecheck check clean service-install ci-tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo,plot]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fl_orchestrator.demo

test: $(STAMP) ci-tools
	$(PY) -m pytest -q

# The pure and unit tests (no daemon process, no federation): well under 30 s on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

# The unit-file checks need systemd-analyze; on CI (root, Debian) install it if missing.
# Elsewhere those tests skip with a message saying so.
ci-tools:
	@if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$$CI" = "true" ] && [ "$$(id -u)" = 0 ]; then \
		echo "installing systemd-analyze for the unit-file checks"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd) >/dev/null \
		|| echo "could not install systemd-analyze: the unit-file checks will skip"; \
	fi

# The examples that need heavy libraries (docs/examples/pytorch_cnn/), in a venv of their own so
# `make test` never installs them; there tests/examples skips. Torch is pinned to the exact
# release: a range or plain `torch` pulls a multi-GB CUDA build.
EXAMPLES_VENV ?= .venv-examples
EXAMPLES_STAMP := $(EXAMPLES_VENV)/.installed
TORCH_PIN ?= torch==2.13.0

$(EXAMPLES_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(EXAMPLES_VENV)
	$(EXAMPLES_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EXAMPLES_VENV)/bin/python -m pip install --quiet -e '.[dev,demo]'
	$(EXAMPLES_VENV)/bin/python -m pip install --quiet '$(TORCH_PIN)'
	@touch $(EXAMPLES_STAMP)

test-examples: $(EXAMPLES_STAMP)
	$(EXAMPLES_VENV)/bin/python -m pytest -q tests/examples

# Only the end-to-end run over a real SyftBox server and clients (syftbox==0.4.0 in its own venv).
test-syftbox: $(STAMP)
	FL_SYFTBOX_REQUIRED=1 $(PY) -m pytest -q -s tests/test_syftbox_sync.py

# Only the daemon driving real syft-flwr 0.5.3 data owners (syft-flwr in its own cached venv,
# tests/syftflwr/README.md); `make test` runs it too and skips it with a message when that venv
# cannot be built.
test-syft-flwr: $(STAMP)
	FL_SYFT_FLWR_REQUIRED=1 $(PY) -m pytest -q -s tests/test_syft_flwr.py tests/test_syft_flwr_resume.py tests/test_syft_flwr_evaluate.py tests/test_syft_flwr_syftbox.py

# syft-flwr's own server next to the daemon over the same DOs: round times and lost replies.
# Options go through COMPARE_ARGS, e.g. make compare-syft-flwr COMPARE_ARGS="--runs 5 --params 1000000".
compare-syft-flwr: $(STAMP)
	$(PY) bench/syft_flwr_compare.py $(COMPARE_ARGS)

# The long crash-safety run: 100 random kill -9s instead of the suite's 20.
chaos: $(STAMP)
	CHAOS_KILLS=100 $(PY) -m pytest -q -s tests/test_chaos.py

# The long decoder fuzz: 20 000 randomized examples per test instead of the suite's 300.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_hostile_fuzz.py

# Speed and memory against the targets in bench/README.md (several GB of disk, a few minutes).
# Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--only ingest,latency".
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# The same plus the sizes that take long: round_overhead at N = 10,000 datasites (about 20 minutes,
# 10,000 sparse result files a round). E.g. make bench-large BENCH_ARGS="--only round_overhead".
bench-large: $(STAMP)
	$(PY) bench/run.py --large $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check fl_orchestrator tests bench
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

# Install the daemon for systemd: /opt/fl-orchestrator/venv, the unit template and /etc/fl-orchestrator.
# Then: put a job at /etc/fl-orchestrator/NAME.toml and `systemctl enable --now fl-orchestratord@NAME`.
SERVICE_PREFIX ?= /opt/fl-orchestrator
# Extras for the service's venv, e.g. SERVICE_EXTRAS='[syft-flwr]' for job.protocol = "syft-flwr".
SERVICE_EXTRAS ?=
service-install:
	id -u fl-orchestrator >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin fl-orchestrator
	$(PYTHON) -m venv $(SERVICE_PREFIX)/venv
	$(SERVICE_PREFIX)/venv/bin/pip install --quiet --upgrade pip
	$(SERVICE_PREFIX)/venv/bin/pip install --quiet ".$(SERVICE_EXTRAS)"
	install -d -m 0750 -g fl-orchestrator /etc/fl-orchestrator
	install -m 0644 systemd/fl-orchestratord@.service /etc/systemd/system/fl-orchestratord@.service
	-systemctl daemon-reload

clean:
	rm -rf .venv .venv-* build *.egg-info .mypy_cache .ruff_cache .pytest_cache .demo
