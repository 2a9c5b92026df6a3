# `make test` and `make demo` work on a fresh clone: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-e2e test-slow demo install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt setuptools  # the SPDX license needs >= 77 (wheel builds)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,llm,search]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# End-to-end runs, SIGKILL resumes, several processes, every method's sweeps (under 30 minutes).
test-e2e: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m e2e tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow tests

# The DeepUnlearn quickstart (U-LiRA is its stage, with the searched hyper-parameters; its report
# includes U-LiRA), then the IAM audit.
demo: $(STAMP)
	$(VENV)/bin/jaxmu deepunlearn --config=quickstart --workdir=runs/quickstart
	$(VENV)/bin/jaxmu iam --config=quickstart:iam --workdir=runs/quickstart/iam

clean:
	rm -rf $(VENV) runs
