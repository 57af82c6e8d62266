# udptunnel: everything a developer or a user runs goes through here.
#   make demo       a real tunnel on loopback, with traffic crossing it
#   make test       the whole test suite
#   make lint       ruff, mypy, and groff on the man page
#   make check      lint and test
#   make bench      our tunnel against Debian's original and the bare kernel path (root)
#   make install    a self-contained installation for an operator (PREFIX, DESTDIR, BINDIR)
#   make uninstall  removes exactly what make install put in place
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
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
ENVDIR ?= $(PREFIX)/lib/udptunnel

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

# make install builds a virtual environment of its own in ENVDIR with pip run by that
# environment's interpreter, so the interpreter that runs make is never changed; it puts a
# launcher for it on BINDIR, the man page in MANDIR, the units in UNITDIR, and the list of
# all it made in ENVDIR/installed-files for make uninstall. No path written into a file
# holds DESTDIR, so a staged tree runs once copied to /. It refuses to overwrite a file it
# did not install (Debian's /usr/bin/udptunnel with PREFIX=/usr). contrib/install.py has
# the details.
# The environment is based on $(PYTHON): the service's user (DynamicUser in
# udptunnel@.service, with ProtectHome=yes and PrivateTmp=yes) must be able to run it, so for
# a service give an interpreter outside /root, /home and /tmp, e.g. PYTHON=/usr/bin/python3.
install:
	$(PYTHON) contrib/install.py install --destdir '$(DESTDIR)' --envdir '$(ENVDIR)' \
		--bindir '$(BINDIR)' --mandir '$(MANDIR)' --unitdir '$(UNITDIR)'

uninstall:
	$(PYTHON) contrib/install.py uninstall --destdir '$(DESTDIR)' --envdir '$(ENVDIR)'

# The units alone, with the program's path filled in (tests/test_systemd.py verifies them);
# not recorded for make uninstall.
install-units:
	$(PYTHON) contrib/install.py units --destdir '$(DESTDIR)' --bindir '$(BINDIR)' \
		--unitdir '$(UNITDIR)'

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
