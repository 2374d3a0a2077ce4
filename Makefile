# The two commands of this repository: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
FIN    := $(VENV)/bin/fin
DEMO   ?= demo_out


.PHONY: demo test test-services install bench-simulate bench-features clean

install: $(VENV)/.installed

# The lock is installed with --no-deps: torchrec declares the CUDA fbgemm-gpu, and resolving it would
# put a second fbgemm next to fbgemm-gpu-cpu. The lock already holds every dependency.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(FIN) simulate --out $(DEMO)/logs --overwrite --report
	$(FIN) validate --logs $(DEMO)/logs
	$(FIN) features --logs $(DEMO)/logs --out $(DEMO)/features

# The Redis online-store test needs a redis-server binary (Debian package); it listens on 127.0.0.1 only.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-services:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

test: install test-services
	$(PY) -m pytest -q

bench-simulate: install
	$(PY) benchmarks/simulate_scale.py

bench-features: install
	$(PY) benchmarks/features_scale.py

clean:
	rm -rf $(DEMO) .pytest_cache
