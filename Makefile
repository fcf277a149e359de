# tinyllm — TinyLLM (Tian et al., arXiv 2402.04616): distil several teacher LLMs into one small student.
#
#   make all                      rationales -> train -> eval (the paper's OBQA row, 80M student)
#   make test                     the offline test suite (tiny random weights)
#   make help                     targets and variables
#
# Every target depends on set-up through a stamp file, so a fresh clone needs no manual step.

# ---- variables (override on the command line: make train DATASET=arc LIMIT=64) -------------------
DATASET  ?= obqa
TEACHERS ?= flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2
STUDENT  ?= google/flan-t5-small
ALPHA    ?=
METHOD   ?= tinyllm
TEACHER  ?=
DEVICE   ?= auto
LIMIT    ?= 0
TRAIN_LIMIT ?= 0
SCORING  ?= generate
DATA     ?= data
CACHE    ?= cache
OUT      ?= out
SPLITS   ?= train
RESUME   ?= 0
ARGS     ?=
CHECK    ?=
TRAIN_ARGS ?=
EVAL_ARGS ?=
SEED     ?=
SEEDS    ?=
ALPHAS   ?= 0.01 0.1 0.5 1 2 3
SWEEP    ?=
FRACTIONS ?= 0.125 0.25 0.5 0.75 1
METHODS  ?=
DATASETS ?= $(DATASET)

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMPS   := .stamps
RUN       = $(OUT)/$(DATASET)/$(METHOD)$(if $(TEACHER),-$(TEACHER))$(if $(SEED),/seed$(SEED))
MODEL     = $(if $(filter inference,$(METHOD)),$(STUDENT),$(RUN)/best)
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TABLE_METHODS ?= inference lora finetune kd tinyllm
TEACHER_NAMES = $(foreach t,$(TEACHERS),$(firstword $(subst =, ,$(t))))
# one pass with SEED empty when SEEDS is not set: the run folder itself, train.py's default seed
SEED_LOOP = $(or $(SEEDS),'')
# the flags every experiment (sweep, fractions, ablations) gives each of its train.py / eval.py runs
EXPERIMENT = --dataset=$(DATASET) --student=$(STUDENT) --teachers="$(TEACHERS)" --data=$(DATA) --cache=$(CACHE) \
  --out=$(OUT) --limit=$(LIMIT) --device=$(DEVICE) --seeds="$(SEEDS)" \
  --train_args="--train_limit=$(TRAIN_LIMIT) $(TRAIN_ARGS)" --eval_args="--scoring=$(SCORING) $(EVAL_ARGS)"

export TINYLLM_ASSETS ?= $(abspath ../shared/assets)

.PHONY: help setup all rationales train eval table sweep fractions ablations study report bench gpu-check test mutants clean
.DEFAULT_GOAL := help

help: ## this list
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "Variables (current value):"
	@echo "  DATASET=$(DATASET)    obqa | arc | piqa | riddle | pubmedqa | bioasq"
	@echo "  TEACHERS=\"$(TEACHERS)\""
	@echo "                  name=source ...; source: release:flan-t5-xl | release:llama-2 | HF id or folder | openai:URL#MODEL"
	@echo "  STUDENT=$(STUDENT)    HF id or folder (T5, or LLaMA-family as a decoder-only student)"
	@echo "  ALPHA=\"$(ALPHA)\"    name=weight ... for Eq. 2 (default 1 for every teacher)"
	@echo "  METHOD=$(METHOD)    tinyllm | finetune | kd | dss | lora | inference"
	@echo "  TEACHER=$(TEACHER)    the one teacher of dss / kd (default: the first of TEACHERS)"
	@echo "  DEVICE=$(DEVICE)    auto | cpu | cuda"
	@echo "  LIMIT=$(LIMIT)    first N examples of each split (0 = all)"
	@echo "  TRAIN_LIMIT=$(TRAIN_LIMIT)    first N training examples only; valid and test stay whole (0 = all)"
	@echo "  SCORING=$(SCORING)    eval: generate (the paper's exact match) | rank | generate,rank"
	@echo "  SPLITS=$(SPLITS)    splits to make rationales for (train,valid)"
	@echo "  DATA=$(DATA)  CACHE=$(CACHE)  OUT=$(OUT)    datasets / rationale cache / checkpoints+results"
	@echo "  RESUME=$(RESUME)    1 continues training from $(RUN)/last"
	@echo "  ARGS=\"$(ARGS)\"    extra --key=value flags for the script behind the target"
	@echo "  CHECK=$(CHECK)    train/eval: 1 only checks the flags, data, cache and run folder (make table does, for every run, first)"
	@echo "  TRAIN_ARGS=\"$(TRAIN_ARGS)\"  EVAL_ARGS=\"$(EVAL_ARGS)\"    extra flags for train.py / eval.py only"
	@echo "  SEEDS=\"$(SEEDS)\"    table/sweep/fractions/ablations: each row once per seed (RUN/seed<N>), mean ± std"
	@echo "  SEED=$(SEED)    train/eval: one seed, in RUN/seed<SEED> (empty: RUN itself, seed 0)"
	@echo "  ALPHAS=\"$(ALPHAS)\"    sweep: the α values of every teacher (grid: their product, §4.1)"
	@echo "  SWEEP=\"$(SWEEP)\"    sweep: an explicit grid instead, every teacher named: a=0.1,1 b=1,3"
	@echo "  FRACTIONS=\"$(FRACTIONS)\"    fractions: of the training set (Fig. 2)"
	@echo "  METHODS=\"$(METHODS)\"    fractions: a curve each (default tinyllm dss finetune); study: compared, last - first (default finetune tinyllm)"
	@echo "  DATASETS=\"$(DATASETS)\"    study: the datasets, each a stratum of the pooled paired analysis"
	@echo "  MUTANTS=\"...\"    mutants: mutmut name patterns of the functions to mutate (default: the method's rules, the statistics)"
	@echo "  run folder: $(RUN)"

# ---- set-up -------------------------------------------------------------------------------------
# torch first, by hand: a bare `pip install torch` on Linux pulls a multi-GB CUDA build. With no
# NVIDIA GPU we ask for the CPU build (a local wheel or PyPI mirror first, then PyTorch's CPU index).
$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/torch: | $(STAMPS)/venv
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	@touch $@

$(STAMPS)/setup: requirements.txt $(STAMPS)/torch
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(STAMPS)/dev: requirements-dev.txt $(STAMPS)/setup
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup: $(STAMPS)/setup ## create .venv and install requirements.txt (CPU torch when no NVIDIA GPU)

# ---- the method: rationales (§3.2) -> student (§3.3) -> accuracy ---------------------------------
# Each script runs as `exec $(PY) ...`: make passes a SIGTERM on to its child, the recipe's shell, and `exec` makes
# the script that child, so that `kill <make>` stops the script cleanly (one line, nothing half-written).
all: ## rationales, train and eval in turn
	$(MAKE) rationales
	$(MAKE) train
	$(MAKE) eval

rationales: $(STAMPS)/setup ## teacher rationales into CACHE (paper §3.2, Eq. 1)
	exec $(PY) tinyllm.py rationales --dataset=$(DATASET) --teachers="$(TEACHERS)" --data=$(DATA) \
	  --cache=$(CACHE) --limit=$(LIMIT) --splits=$(SPLITS) --device=$(DEVICE) $(ARGS)

train: $(STAMPS)/setup ## train the student with METHOD into OUT/DATASET/METHOD (paper §3.3, Eq. 2-4)
	exec $(PY) train.py --dataset=$(DATASET) --student=$(STUDENT) --teachers="$(TEACHERS)" --alpha="$(ALPHA)" \
	  --method=$(METHOD) --teacher=$(TEACHER) --data=$(DATA) --cache=$(CACHE) --out=$(RUN) \
	  --limit=$(LIMIT) --train_limit=$(TRAIN_LIMIT) --device=$(DEVICE) --resume=$(RESUME) --seed=$(SEED) \
	  --check_only=$(CHECK) $(ARGS) $(TRAIN_ARGS)

eval: $(STAMPS)/setup ## accuracy of the trained student (or STUDENT for METHOD=inference)
	exec $(PY) eval.py --dataset=$(DATASET) --model=$(MODEL) --method=$(METHOD) --data=$(DATA) \
	  --out=$(RUN) --limit=$(LIMIT) --scoring=$(SCORING) --device=$(DEVICE) --check_only=$(CHECK) $(ARGS) $(EVAL_ARGS)

# Inference decodes greedily, with no seed: it runs once whatever SEEDS says. One shell for both loops, so
# that each run can say "table: run k of n". Two passes: the first only checks every run (CHECK=1: its flags,
# data, rationale caches and run folder), so that a mistake in the last run stops the table before the first.
TABLE_RUNS = $(words $(filter inference,$(TABLE_METHODS)) \
  $(foreach s,$(SEED_LOOP),$(filter-out inference,$(TABLE_METHODS)) $(TEACHER_NAMES)))

table: $(STAMPS)/setup ## train+eval each baseline and TinyLLM (per seed of SEEDS), print Table 1 (OUT/DATASET/table.md)
	@for pass in check run; do \
	  c=$$([ $$pass = check ] && echo 1); k=0; \
	  [ $$pass = check ] && echo "table: checking the flags, data, rationale caches and run folders of all $(TABLE_RUNS) runs"; \
	  for m in $(TABLE_METHODS); do \
	    if [ $$m = inference ]; then \
	      k=$$((k + 1)); [ $$pass = run ] && echo "table: run $$k of $(TABLE_RUNS): METHOD=$$m"; \
	      $(MAKE) --no-print-directory eval METHOD=$$m CHECK=$$c || exit 1; continue; \
	    fi; \
	    for s in $(SEED_LOOP); do \
	      k=$$((k + 1)); [ $$pass = run ] && echo "table: run $$k of $(TABLE_RUNS): METHOD=$$m$${s:+ SEED=$$s}"; \
	      $(MAKE) --no-print-directory train METHOD=$$m SEED=$$s CHECK=$$c && \
	      $(MAKE) --no-print-directory eval METHOD=$$m SEED=$$s CHECK=$$c || exit 1; \
	    done; \
	  done; \
	  for t in $(TEACHER_NAMES); do for s in $(SEED_LOOP); do \
	    k=$$((k + 1)); [ $$pass = run ] && echo "table: run $$k of $(TABLE_RUNS): METHOD=dss TEACHER=$$t$${s:+ SEED=$$s}"; \
	    $(MAKE) --no-print-directory train METHOD=dss TEACHER=$$t SEED=$$s CHECK=$$c && \
	    $(MAKE) --no-print-directory eval METHOD=dss TEACHER=$$t SEED=$$s CHECK=$$c || exit 1; \
	  done; done; \
	done
	exec $(PY) eval.py table --dataset=$(DATASET) --out=$(OUT)

# ---- the paper's experiments, one command each: resumable (a finished run, with results.json, is kept) -----
sweep: $(STAMPS)/setup ## TinyLLM for every α combination of ALPHAS (or SWEEP), best on valid (§4.1, Fig. 3)
	exec $(PY) experiments.py sweep $(EXPERIMENT) --alphas="$(ALPHAS)" --sweep="$(SWEEP)" $(ARGS)

fractions: $(STAMPS)/setup ## METHODS on FRACTIONS of the training set: the Fig. 2 curve and table
	exec $(PY) experiments.py fractions $(EXPERIMENT) --fractions="$(FRACTIONS)" --methods="$(or $(METHODS),tinyllm dss finetune)" --alpha="$(ALPHA)" $(ARGS)

ablations: $(STAMPS)/setup ## Table 2: without each teacher, without in-context examples / teacher forcing
	exec $(PY) experiments.py ablations $(EXPERIMENT) --alpha="$(ALPHA)" $(ARGS)

study: $(STAMPS)/setup ## METHODS on every dataset of DATASETS per seed of SEEDS: the pooled paired verdict (OUT/study/)
	exec $(PY) experiments.py study $(EXPERIMENT) --datasets="$(DATASETS)" --methods="$(or $(METHODS),finetune tinyllm)" \
	  --alpha="$(ALPHA)" $(ARGS)

report: $(STAMPS)/setup ## OUT/DATASET/report.md: every table and figure there, with the commands that made them
	exec $(PY) experiments.py report --dataset=$(DATASET) --out=$(OUT)

bench: $(STAMPS)/dev ## speed and memory against transformers, side by side (writes OUT/bench.json)
	exec $(PY) tests/bench.py --device=$(DEVICE) --out=$(OUT) $(ARGS)

# gpu-check runs where a CUDA build of torch is installed already: the venv's python when there is one, else
# python3 (a GPU image with torch, transformers and pytest; nothing is installed). The tests' tiny models and the
# bench's job cases read TINYLLM_ASSETS (the tokenizers and the OBQA release), and skip without it.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check: ## on a CUDA machine, in < 8 min: the CUDA tests, then the bench on the GPU (OUT/bench.json)
	@nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
	$(GPU_PY) -m pytest -q tests/test_cuda.py tests/test_llama.py tests/test_t5.py tests/test_compile.py -k "cuda or bf16"
	$(GPU_PY) tests/bench.py --device=cuda --out=$(OUT) --budget_s=330 $(ARGS)

# ---- tests --------------------------------------------------------------------------------------
test: $(STAMPS)/dev ## offline test suite on tiny random weights (assets via TINYLLM_ASSETS)
	exec $(PY) -m pytest -q tests $(ARGS)

# The mutation pass (README, Tests): mutmut (setup.cfg) mutates each of these functions and runs the tests that reach
# it; a mutant no test notices is a rule the tests do not pin. Not part of `make test`: it takes most of an hour.
MUTANTS ?= prompts.x_teacher_prompt* prompts.x__block* prompts.x_format_options* data.x_in_context_examples* \
  data.x_stable_hash* tinyllm.x_is_stale* train.x_parse_alpha* train.x_usable_rationale* train.x_teacher_rationales* \
  train.x_build_tasks* train.x_micro_batch_loss* train.x_maybe_eval* train.x_valid_accuracy* train.x_maybe_save* \
  student.x_predict* student.x_accuracy* eval.x_paired_bootstrap* eval.x_bootstrap_interval* eval.x_sign_flip_p* \
  eval.x_seed_bootstrap_interval* eval.x_seed_permutation_p* eval.x_std_ratio_interval* eval.x_mcnemar_exact* \
  eval.x_correct_by_id* experiments.x_question_scores* experiments.x_paired_runs* experiments.x_study_analysis* \
  experiments.x_verdict*
mutants: $(STAMPS)/dev ## mutation pass (mutmut) over the method's rules and the statistics; not part of make test
	@# the mutated copy's tests that call make use this checkout's environment, not one built inside the copy
	mkdir -p mutants && ln -sfn ../$(VENV) mutants/$(VENV) && ln -sfn ../$(STAMPS) mutants/$(STAMPS)
	@# one thread per test process: mutmut runs one per core
	OMP_NUM_THREADS=1 $(PY) -m mutmut run $(foreach m,$(MUTANTS),"$(m)")
	$(PY) -m mutmut results --all true | $(PY) tests/mutants.py $(foreach m,$(MUTANTS),"$(m)")

clean: ## remove run outputs (keeps .venv, DATA and CACHE)
	rm -rf $(OUT) .pytest_cache __pycache__ tests/__pycache__
