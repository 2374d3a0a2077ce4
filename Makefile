# The two commands of this repository: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
FIN    := $(VENV)/bin/fin
DEMO   ?= demo_out
DEMO_PORT ?= 50051
# the demo trains two models side by side, each with half the CPUs as intra-op threads
TRAIN_THREADS ?= $(shell n=$$(nproc); echo $$(( n > 1 ? n / 2 : 1 )))
DEMO_TRAIN = $(FIN) train --data $(DEMO)/features --out $(DEMO)/models --config configs/batch2048.yaml \
	--threads $(TRAIN_THREADS)

# $(call side_by_side,A,B): run command lists A and B at once; A's output streams, B's follows when both are
# done; fails when either fails
define side_by_side
{ $(2); } > $(DEMO)/side_by_side.log 2>&1 & second=$$!; { $(1); }; first_rc=$$?; wait $$second; second_rc=$$?; \
	cat $(DEMO)/side_by_side.log; rm -f $(DEMO)/side_by_side.log; [ $$first_rc -eq 0 ] && [ $$second_rc -eq 0 ]
endef


.PHONY: demo test test-fast lint test-services compiler install bench-simulate bench-features bench-train bench-serve bench-serve-work bench-serve-floor clean

PROTOS := $(shell find proto -name '*.proto')

install: $(VENV)/.installed serving/pb/.generated compiler

# The lock is installed with --no-deps: torchrec declares the CUDA fbgemm-gpu, and resolving it would
# put a second fbgemm next to fbgemm-gpu-cpu. The lock already holds every dependency.
# uv installs it in ~50 s against pip's ~135 s on 2 cores (bytecode compiled, as pip does, since every `fin`
# command and Ray worker would otherwise compile what it imports); uv does not read pip's configuration, so
# the sources pip is configured with (find-links, where a +cpu torch wheel may lie; indexes) are passed on.
# Where uv cannot install, pip does.
UV_VERSION ?= 0.13.9
pip_config = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -nE "s/^[^.]*\.$(1)='(.*)'$$/\1/p" | head -n1)
UV_SOURCES = $(addprefix --index-url ,$(call pip_config,index-url)) \
	$(addprefix --extra-index-url ,$(call pip_config,extra-index-url)) \
	$(addprefix --find-links ,$(call pip_config,find-links)) --index-strategy unsafe-best-match
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	($(PY) -m pip install --quiet uv==$(UV_VERSION) && $(PY) -m uv pip install --quiet --compile-bytecode \
	  --python $(PY) --no-deps $(UV_SOURCES) -r requirements.lock) \
	  || { echo "uv could not install the lock: pip installs it"; $(PY) -m pip install --quiet --no-deps -r requirements.lock; }
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# gRPC code is generated from proto/ by the build, never edited (serving/pb/ is not in git)
serving/pb/.generated: $(PROTOS) $(VENV)/.installed
	$(PY) -m serving.codegen
	touch $@

demo: install
	$(FIN) simulate --out $(DEMO)/logs --overwrite --report
	$(FIN) validate --logs $(DEMO)/logs
	$(FIN) features --logs $(DEMO)/logs --out $(DEMO)/features
	rm -rf $(DEMO)/models $(DEMO)/report   # a fresh model repository each run: fin/1 is the version promoted below
	@# FIN and DIN at most 2 epochs each; the DNN (seconds an epoch) up to the default 8, stopping after two
	@# epochs without a better validation AUC (its AUC jumps from epoch to epoch: one such epoch stopped it at
	@# 0.78 test AUC, two let it reach 0.80); benchmarks/quality.py trains every model to convergence
	@# the creative encoder, then every creative embedded into Feast: the models read them as an image modality
	$(FIN) train-encoder --data $(DEMO)/features --out $(DEMO)/models
	$(FIN) embed-creatives --data $(DEMO)/features --encoder $(DEMO)/models/creative_encoder
	@# two trainings at a time: a second intra-op thread gains FIN's step nothing on 2 cores, so a pair
	@# takes about the time of one (benchmarks/README.md, "Threads"); batches of 2,048 (DEMO_TRAIN): on this
	@# world as good as the default 512 and 1.5x the examples/s. Two queues of about equal length: FIN (then
	@# its compiled scoring package) and DIN; FIN without creatives and the DNN
	@# the models only evaluated are not compiled (--no-compile; the server scores them eagerly, and says so):
	@# FIN, the one promoted and served, builds its compiled scoring package
	$(call side_by_side,$(DEMO_TRAIN) --model fin --epochs 2 && $(DEMO_TRAIN) --model din --epochs 2 --no-compile,\
	    $(DEMO_TRAIN) --model fin --name fin_ids --no-images --epochs 2 --no-compile && \
	    $(DEMO_TRAIN) --model dnn --patience 2 --no-compile)
	$(FIN) evaluate --data $(DEMO)/features --repo $(DEMO)/models --models fin fin_ids din dnn --out $(DEMO)/report
	$(FIN) promote --models $(DEMO)/models --name fin --version 1 --report $(DEMO)/report/report.json
	@# serve on loopback, replay three logged requests through gRPC; then score user 1418 the day after the
	@# logs end, ingest five orders it placed since, and score it again (its pCTRs move); then stop the
	@# server (SIGTERM drains it; the ingested orders are in $(DEMO)/logs for the next features run)
	$(FIN) serve --models $(DEMO)/models --feast-repo $(DEMO)/features/feast --port $(DEMO_PORT) \
	  --behaviour-log $(DEMO)/logs & pid=$$!; \
	  $(FIN) score --addr 127.0.0.1:$(DEMO_PORT) --replay $(DEMO)/features --requests 3 --wait 120 && \
	  $(FIN) score --addr 127.0.0.1:$(DEMO_PORT) --request configs/demo/score_request.json --brief && \
	  $(FIN) ingest --addr 127.0.0.1:$(DEMO_PORT) --events configs/demo/ingest_events.json && \
	  $(FIN) score --addr 127.0.0.1:$(DEMO_PORT) --request configs/demo/score_request.json --brief; rc=$$?; \
	  kill $$pid; wait $$pid; exit $$rc

# AOTInductor compiles each artifact's scoring package (model.pt2) with the system's C++ compiler
compiler:
	@command -v g++ >/dev/null 2>&1 || { echo "installing g++ (AOTInductor compiles scoring packages with it)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++ >/dev/null; }

# The Redis online-store test needs a redis-server binary (Debian package; it listens on 127.0.0.1 only),
# the TLS test the openssl command to make a throw-away certificate.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-services:
	@command -v redis-server >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server openssl >/dev/null; }

# CI's command: lint, then every test in TEST_PROCESSES processes (pytest-xdist; each test file runs whole in
# one of them, so module fixtures are built once; the session fixtures are built in each): 11-17 minutes on
# 2 cores against ~22.5 in one process, which kept ~0.9 of the cores busy (imports, servers and Ray starting)
TEST_PROCESSES ?= 2
test: install test-services lint
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The unit tier for quick loops (under 2 minutes): no features run, training, Ray, Feast or server
test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow"

lint: install
	$(VENV)/bin/ruff check .

bench-simulate: install
	$(PY) benchmarks/simulate_scale.py

bench-features: install
	$(PY) benchmarks/features_scale.py

bench-train: install
	$(PY) benchmarks/train_scale.py

bench-serve: install
	$(PY) benchmarks/serve_scale.py

bench-serve-work: install
	$(PY) benchmarks/serve_work.py

bench-serve-floor: install
	$(PY) benchmarks/serve_floor.py

clean:
	rm -rf $(DEMO) .pytest_cache
