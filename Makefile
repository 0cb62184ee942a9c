# The two commands of the README:
#   make demo   set everything up on a fresh machine and run the main job on the emulated rasp4b
#   make test   set everything up and run the tests (what .ci/run does)
# Everything is idempotent: a second run skips what is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Cross toolchains for aarch64 and armv7 boards, qemu-user for the emulated device,
# debootstrap for its sysroot, file for humans checking ELF files, cmake and g++ for the app
# kit's native runner (edgecomp package).
APT_PACKAGES := g++-aarch64-linux-gnu g++-arm-linux-gnueabihf qemu-user debootstrap file cmake g++
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test system venv lint

demo: system venv
	$(VENV)/bin/edgecomp demo

test: system venv
	$(PY) -m pytest -ra --durations=15

lint: venv
	$(VENV)/bin/ruff check edgecomp tests bench

system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@
