# tokenprune — every target sets up the environment it needs on first use.
# The environment is the active virtual environment if one is active, else .venv in this checkout.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenprune-installed
ARGS ?=
PYTEST_ARGS ?=
EXP ?=
comma := ,
empty :=
space := $(empty) $(empty)
# Offline by default: nothing downloads weights or datasets at test or default run time.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export WANDB_MODE ?= offline
export LOGURU_LEVEL ?= INFO
export NO_MKDOCS_2_WARNING ?= 1

.DEFAULT_GOAL := help
.PHONY: help install lock test-latest test test-fast docs run tables reproduce miniature miniature-mapper lint format bench gpu-check clean mini-model

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml setup.py scripts/install.sh scripts/check_env.py
	bash scripts/install.sh $(VENV)
	@touch $(STAMP)

install: $(STAMP) ## set up the environment: exactly requirements.lock (an installed torch, e.g. CUDA, is kept)

lock: install ## regenerate requirements.lock from pyproject.toml (UPGRADE=1: newest allowed versions)
	bash scripts/lock.sh $(PY) requirements.lock $(if $(UPGRADE),--upgrade)
	$(MAKE) --no-print-directory install

LATEST := build/latest
LATEST_TESTS := tests/test_install.py tests/test_smoke_tasks.py::test_simple_evaluate_end_to_end \
	tests/test_eval_pipeline.py::test_lmms_eval_cli_runs_model_tokenprune \
	tests/test_train_lora.py::test_fit_with_prumerge_plus_in_the_loop
test-latest: install ## drift check, not in CI: newest allowed versions in a throw-away env run a quick subset
	rm -rf $(LATEST) && mkdir -p $(LATEST)
	bash scripts/lock.sh $(PY) $(LATEST)/requirements.lock
	$(PY) scripts/check_env.py --diff $(LATEST)/requirements.lock
	TOKENPRUNE_LOCK=$(LATEST)/requirements.lock bash scripts/install.sh $(LATEST)/venv
	$(LATEST)/venv/bin/python -m pytest -p no:cacheprovider $(LATEST_TESTS)

test: install ## set up, then run the whole test suite (what CI runs)
	$(PY) -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

FAST := not slow and not integration and not gpu
test-fast: install ## the development loop: contract matrix, parity and unit tests (no slow/integration/gpu)
	$(PY) -m pytest -n 2 --dist loadscope -m "$(FAST)" $(PYTEST_ARGS)

docs: install ## build the documentation site from docs/ into build/site (--strict: a broken link fails)
	$(PY) -m mkdocs build --strict --site-dir build/site

run: install ## set up, then run the main job on the embedded default (extra Hydra overrides: ARGS=...)
	$(PY) -m tokenprune.train reducer=prumerge_plus $(ARGS)

tables: install ## tables (Markdown, LaTeX) + plots from outputs/results: every experiment, or EXP=name
	$(PY) -m tokenprune.tables $(if $(EXP),experiment=$(subst $(space),$(comma),$(strip $(EXP)))) $(ARGS)

reproduce: install ## EXP=name [ARGS="launcher=slurm ..."]: the experiment's sweep, then its tables and plots
	@test -n "$(EXP)" || { echo "usage: make reproduce EXP=<name> [ARGS=...]  (names: configs/experiment/*.yaml)"; exit 2; }
	@for exp in $(EXP); do echo "== sweep $$exp"; $(PY) -m tokenprune.train -m experiment=$$exp $(ARGS) || exit 1; done
	$(PY) -m tokenprune.tables experiment=$(subst $(space),$(comma),$(strip $(EXP))) $(ARGS) $(TABLES_ARGS)

MINI_EXPS = mini_shapes mini_shapes_budgets mini_shapes_lora mini_shapes_lora_baselines mini_shapes_peers

miniature: install ## the miniature reproduction on a CPU: sweeps, token report, tables, plots, README table (~52 min)
	$(MAKE) --no-print-directory reproduce EXP="$(MINI_EXPS)" ARGS="$(ARGS)" TABLES_ARGS=publish=true
	$(PY) scripts/mini_tokens.py --split test

miniature-mapper: install ## the miniature's explainability-mapper comparison: labels, mapper, oracle, table (~40 min)
	$(PY) -m tokenprune.label model=mini_shapes source=shapes source.n=100 label.progress=false
	$(MAKE) --no-print-directory reproduce EXP="mini_shapes_mapper mini_shapes_oracle" ARGS="$(ARGS)" TABLES_ARGS=publish=true

lint: install ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install ## ruff fix + format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

mini-model: install ## rebuild the shipped mini_shapes checkpoint (<= 60 min on 2 CPU cores; recipe: configs/recipe/mini_shapes.yaml)
	$(PY) -m tokenprune.recipes.mini_shapes $(ARGS)

bench: install ## run the speed/memory benchmarks in scripts/bench_*.py
	@for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

gpu-check: install ## on a CUDA machine: numerics, 7B-shaped timings -> outputs/gpu_check/report.{json,md} (< 10 min)
	$(PY) scripts/gpu_check.py --out outputs/gpu_check $(ARGS)

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
	find outputs -mindepth 1 -not -name .gitkeep -delete
