.PHONY: setup demo test bench ui validate
setup:
	@bin/setup
demo: setup
	.venv/bin/msif demo
test: setup
	.venv/bin/python -m pytest -q
bench: setup
	@echo "bench: installing the benchmark extra and kronfluence 1.0.1 (--no-deps) ..."
	.venv/bin/pip install -e ".[dev,bench]" && .venv/bin/pip install --no-deps kronfluence==1.0.1
	.venv/bin/python bench/run_bench.py
# `dagster dev` warns that it is superseded by `dg dev` (package dagster-dg-cli, whose release
# lags dagster's and would downgrade it); that one warning is silenced here, for this launch only.
UI_WARNINGS = ignore:Function `dev_command` is superseded:FutureWarning
ui: setup
	DAGSTER_HOME=$(CURDIR)/dagster_home .venv/bin/python -W '$(UI_WARNINGS)' -m dagster dev -w workspace.yaml
validate: setup
	.venv/bin/msif validate
