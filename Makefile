# udptunnel: everything a developer or a user runs goes through here.
#   make demo       a real tunnel on loopback, with traffic crossing it
#   make test       the whole test suite
#   make lint       ruff, mypy, and groff on the man page
#   make check      lint and test
#   make bench      our tunnel against Debian's original and the bare kernel path (root)
# The virtual environment in $(VENV) is made on first use with the package (editable) and its
# run-time dependencies, all that make demo needs; test, lint and bench each add their extra
# of pyproject.toml to it on their first use. Nothing is installed by hand.

PYTHON ?= python3
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
UNITS := udptunnel@.service udptunnel@.socket

VPY := $(VENV)/bin/python
# The environment's packages come from $(PYTHON)'s own pip run on it (--python, pip 22.3):
# giving the environment a pip of its own (ensurepip) takes as long as all the rest of make
# demo. Only a $(PYTHON) without pip has the environment get its own.
PIP = $$([ -x $(VENV)/bin/pip ] && echo $(VPY) || echo $(PYTHON)) -m pip --python $(VPY) \
	--disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: all venv demo test lint check bench install install-units uninstall clean

all: venv

venv: $(STAMP)

# The man page is copied into the environment at install time, so it counts as a source.
$(STAMP): pyproject.toml man/udptunnel.1
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(VPY) --version >/dev/null 2>&1 \
		|| $(VPY) -m ensurepip --default-pip >/dev/null
	$(PIP) install --quiet --editable .
	touch $@

# An extra (test, lint, bench) on the first use of the target that needs it.
$(VENV)/.installed-%: pyproject.toml | $(STAMP)
	$(PIP) install --quiet --editable '.[$*]'
	touch $@

demo: $(STAMP)
	$(VPY) contrib/demo.py

test: $(VENV)/.installed-test
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-lint
	$(VPY) -m ruff check udptunnel tests contrib
	$(VPY) -m ruff format --check udptunnel tests contrib
	$(VPY) -m mypy
	@out=$$(groff -man -ww -z man/udptunnel.1 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; exit 1; fi

check: lint test

bench: $(VENV)/.installed-bench
	$(VPY) contrib/bench/run.py $(BENCH_ARGS)

# The package with its man page, and the systemd units with the program's path filled in.
install: install-units
	$(PYTHON) -m pip install --disable-pip-version-check \
		--root '$(DESTDIR)/' --prefix '$(PREFIX)' .

install-units:
	install -d '$(DESTDIR)$(UNITDIR)'
	for unit in $(UNITS); do \
		sed 's|@BINDIR@|$(BINDIR)|g' contrib/systemd/$$unit > '$(DESTDIR)$(UNITDIR)'/$$unit \
		&& chmod 644 '$(DESTDIR)$(UNITDIR)'/$$unit || exit 1; \
	done

uninstall:
	$(PYTHON) -m pip uninstall --yes udptunnel
	for unit in $(UNITS); do rm -f '$(DESTDIR)$(UNITDIR)'/$$unit; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
