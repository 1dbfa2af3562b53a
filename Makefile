# Two entry points for a fresh Debian / Raspberry Pi OS machine:
#   make demo   run the main job (a complete federated training on one machine)
#   make test   lint, type-check and run the test suite (compiled kernels, then the NumPy
#               path, then the kernel tests on an AddressSanitizer build)
# Both create or reuse .venv and install what they need, including the `mosquitto` package.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedge-installed
SOURCES := pyproject.toml setup.py $(wildcard kernels/*.pyx kernels/*.pxd kernels/*.h)

.PHONY: demo test lint typecheck pytest bench sanitize test-arm broker-deps clean

demo: $(STAMP) broker-deps
	$(BIN)/fedge sim

test: $(STAMP) broker-deps lint typecheck pytest sanitize

lint: $(STAMP)
	$(BIN)/ruff check edge kernels server_stub tests setup.py
	$(BIN)/ruff format --check edge kernels server_stub tests setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	FEDGE_REQUIRE_COMPILED=1 $(BIN)/python -m pytest -q
	KERNELS_PUREPYTHON=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/fedge bench kernels

# Kernel tests against an AddressSanitizer + bounds-checked build of the kernels.
sanitize: $(STAMP)
	.ci/sanitize

# The kernel, codec and device-side unit tests on a Raspberry Pi's CPU (64- and
# 32-bit), cross-compiled and run under qemu-user from an x86-64 machine; fetches
# Debian's arm Python and NumPy (docs/KERNELS.md).
test-arm: $(STAMP)
	.ci/foreign-arch arm64
	.ci/foreign-arch armhf

# The Debian packages the project needs: python3-venv to make the virtualenv,
# a C compiler and Python headers for the kernels, mosquitto for the broker.
$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { sh deploy/install-system-deps.sh && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(VENV)/bin/python $(SOURCES)
	@{ command -v cc >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1; } || sh deploy/install-system-deps.sh
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev,litert]'
	$(BIN)/python -c "import kernels; print('fedge kernels backend:', kernels.BACKEND)"
	@touch $(STAMP)

broker-deps:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || sh deploy/install-system-deps.sh

clean:
	rm -rf build *.egg-info kernels/*.so kernels/_quantize.c kernels/_sparsify.c
