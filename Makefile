.PHONY: setup demo test bench ui
setup:
	@bin/setup
demo: setup
	.venv/bin/msif demo
test: setup
	.venv/bin/python -m pytest -q
bench: setup
	.venv/bin/pip install -q -e ".[dev,bench]" && .venv/bin/pip install -q --no-deps kronfluence==1.0.1
	.venv/bin/python bench/run_bench.py
ui: setup
	DAGSTER_HOME=$(CURDIR)/dagster_home .venv/bin/dagster dev -w workspace.yaml
