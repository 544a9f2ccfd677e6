# webstack: `make demo` builds the lab and deploys the stack; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
PYINFRA := $(VENV)/bin/pyinfra
STAMP := $(VENV)/.installed
HOST_PACKAGES := debootstrap systemd-container nftables iproute2 openssh-client openssl sudo git python3-venv rsync pebble
LAB_INV := inventories/lab

.PHONY: help setup demo test unit lint integration lab-up lab-down lab-status site bench docs

help:
	@echo "make demo   - set up, boot the lab fleet, deploy the stack"
	@echo "make test   - lint, unit tests, then integration tests against the lab"
	@echo "make bench  - measurements (bench/README.md)"
	@echo "make lab-down - remove the lab"

/var/lib/webstack-lab/.host-packages: Makefile
	@test "$$(id -u)" = 0 || { echo "webstack: the lab needs root (systemd-nspawn, netns, nftables)" >&2; exit 2; }
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing host packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	mkdir -p $(@D) && touch $@

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: /var/lib/webstack-lab/.host-packages $(STAMP)

lab-up: setup
	$(PY) -m lab up
	$(PY) -m webstack.labsecrets $(LAB_INV)

lab-down: setup
	$(PY) -m lab down

lab-status: setup
	$(PY) -m lab status

# Fresh servers accept only root with a key: onboard them once, then converge as the admin user.
site: lab-up
	$(VENV)/bin/webstack onboard $(LAB_INV)
	$(PYINFRA) -y inventories/lab.py deploys/site.py

demo: site
	@echo
	@echo "The stack is up: $$(grep -c address: $(LAB_INV)/hosts.yml) Debian servers on 10.77.0.0/24."
	@echo "  URL:       https://www.webstack.test/app  (VIP 10.77.0.100; trust inventories/lab/ca.crt)"
	@echo "             curl --cacert $(LAB_INV)/ca.crt --resolve www.webstack.test:443:10.77.0.100 https://www.webstack.test/app"
	@echo "  log in:    $(PY) -m lab ssh db1          (as ops, commands under sudo)"
	@echo "  converge:  $(PYINFRA) inventories/lab.py deploys/site.py"

lint: setup
	$(VENV)/bin/ruff check webstack webstack_agent roles lab deploys inventories tests bench examples
	$(VENV)/bin/mypy webstack webstack_agent roles lab
	$(VENV)/bin/mypy examples/demoapp  # separately: a release directory of modules, not a package
	$(PY) -m webstack.cli docs --check

unit: setup
	$(VENV)/bin/pytest -q tests/unit

# Every slow step of the run (CLI runs, waits, commands of 0.5 s or more) with its test, for the
# suite's time budget: /var/lib/webstack-lab/test-trace.log (tests/integration/conftest.py).
TRACE := /var/lib/webstack-lab/test-trace.log

integration: setup
	rm -f $(TRACE)
	WEBSTACK_TEST_TRACE=$(TRACE) $(VENV)/bin/pytest -q --durations=40 tests/integration

test: lint unit integration

bench: site
	$(PY) bench/run.py
	$(PY) bench/database.py
	$(PY) bench/backup.py
	$(PY) bench/web.py

docs: setup
	$(PY) -m webstack.cli docs
