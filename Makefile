# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   # installs into .venv, then runs the whole pipeline on synthetic demo posts
#   make test   # installs into .venv (with test extras), then lint + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= runs/demo
# Subprocesses (ray start, the job's `python`) must find the virtualenv's programs.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-quick lint bench bench-quick install clean

$(BIN)/hashtag: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(BIN)/hashtag

install: $(BIN)/hashtag

demo: install
	$(BIN)/hashtag pipeline --demo --out $(OUT)

lint: install
	$(BIN)/ruff check hashtag jobs tests bench
	$(BIN)/ruff format --check hashtag jobs tests bench

test: lint
	$(BIN)/python -m pytest -ra

test-quick: lint
	$(BIN)/python -m pytest -ra -m "not cluster and not slow"

# Every bench at its defaults: what README.md and docs/ quote (hours on 2 cores).
bench: install
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

# The same benches at small sizes (minutes): the figures' shape, not the documented values.
bench-quick: install
	$(BIN)/python bench/bench_embed.py --quick
	$(BIN)/python bench/bench_scrape.py --posts 200
	$(BIN)/python bench/bench_merge.py --rows 100000
	$(BIN)/python bench/bench_eval.py --images 10000
	$(BIN)/python bench/bench_grid.py
	$(BIN)/python bench/bench_kernel.py --rows 5000
	$(BIN)/python bench/bench_hostile.py --fetch-deadline-s 10
	$(BIN)/python bench/bench_scale.py --small 4096 --factor 4 --repeats 1
	$(BIN)/python bench/bench_quality.py --sets feedme-food --splits 2

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
