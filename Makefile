VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: test test-cluster run data bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not gpu and not cluster"  # two workers, a test module each at a time

# launcher: ray on a Ray cluster of its own (tests/test_ray.py) and Tune survival (tests/test_tune_survival.py):
# minutes, so a tier of its own
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster

data: $(STAMP)
	$(PY) -m trainrig data

run: $(STAMP) data
	$(VENV)/bin/trainer fit

bench: $(STAMP) data
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/imagefolder.py

docs: $(STAMP)
	$(VENV)/bin/trainer config keys --markdown > docs/config.md

clean:
	rm -rf $(VENV) build src/*.egg-info
