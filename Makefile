# Set-up and entry points. `make run` runs the main job, `make test` the tests.
#
# TORCH_SPEC   pip requirement for PyTorch (default: the CPU build on this machine's disk).
#              Set it empty to use a torch that is already installed (with SYSTEM_SITE=1).
# SYSTEM_SITE  1: the venv sees the system's site-packages (a GPU machine's own PyTorch).
# OFFLINE      1: install only from the wheels in .device/wheels (`make device-bundle` fills it).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
SYSTEM_SITE ?= 0
OFFLINE     ?= $(if $(wildcard .device/wheels/*.whl),1,0)
RUN_ARGS    ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV_FLAGS := $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages,)
PIP_FLAGS  := $(if $(filter 1,$(OFFLINE)),--no-index --find-links .device/wheels --no-build-isolation,)
EXTRAS     := $(if $(filter 1,$(OFFLINE)),,[test])

.PHONY: run test install redis device-bundle clean

run: install redis
	$(BIN)/torpor up --demo $(RUN_ARGS)

test: install redis
	$(BIN)/python -m pytest -q tests

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q $(PIP_FLAGS) "$(TORCH_SPEC)",)
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e ".$(EXTRAS)"
	touch $@

# redis-server: on PATH, or unpacked under .device/redis by `make device-bundle`, or installed
# from Debian's packages when we are root.
redis:
	@command -v redis-server >/dev/null 2>&1 || test -x .device/redis/usr/bin/redis-server || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server from Debian's packages"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; \
	  else echo "redis-server is missing: run 'sudo apt-get install redis-server' (or make device-bundle)"; exit 1; fi; }

# Everything a GPU machine without a package registry needs: wheels of the pure-Python
# dependencies it lacks and Debian's redis-server unpacked with its libraries.
device-bundle:
	rm -rf .device && mkdir -p .device/wheels .device/debs
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .device/wheels \
	  flask werkzeug itsdangerous blinker gunicorn redis setuptools jsonschema jsonschema-specifications referencing rpds-py \
	  pytest pluggy iniconfig pytest-timeout
	cd .device/debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1
	for f in .device/debs/*.deb; do dpkg -x $$f .device/redis; done

clean:
	rm -rf $(VENV) .state
