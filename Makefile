# `make demo`: set up, start a local master and two slaves, run the quickstart notebook against them.
# `make test`: set up, run the whole test suite.
.PHONY: setup demo test lab

setup:
	./scripts/setup.sh

demo: setup
	./scripts/demo.sh

lab: setup
	.venv/bin/python -m pip install -q jupyterlab
	./scripts/demo.sh --lab

test:
	./scripts/setup.sh --tests
	.venv/bin/python -m pytest
