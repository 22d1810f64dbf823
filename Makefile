# dancegrpo — one Makefile for the workspace. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= services/rewards.yaml
TRAIN_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.install-stamp
INSTALL_INPUTS := requirements-torch.txt requirements-test-nodeps.txt requirements-dev.txt \
	packages/proto/pyproject.toml packages/rewards/pyproject.toml packages/trainer/pyproject.toml

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.DEFAULT_GOAL := help
.PHONY: help install proto serve-rewards demo train test lint format bench check-deploy lock-groups clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv/ and install torch, the three packages (editable; dev = every extra) and the dev tools

$(STAMP): $(INSTALL_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -r requirements-torch.txt
	$(PIP) install --quiet -c requirements-torch.txt \
		-e "packages/proto[dev]" -e "packages/rewards[dev]" -e "packages/trainer[dev]"
	$(PIP) install --quiet --no-deps -r requirements-test-nodeps.txt
	$(PIP) install --quiet -c requirements-torch.txt -r requirements-dev.txt
	@# The hpsv2 1.2.0 wheel omits its tokenizer vocabulary (the same file open_clip ships).
	@$(PY) -c "import importlib.util as u, pathlib, shutil, open_clip; f = pathlib.Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz'; shutil.copy(f, pathlib.Path(u.find_spec('hpsv2').origin).parent / 'src/open_clip' / f.name)"
	@$(PY) -c "import torch, dancegrpo_proto, dancegrpo_rewards, dancegrpo_trainer; print('installed: torch', torch.__version__)"
	@touch $(STAMP)

proto: $(STAMP) ## Regenerate the committed gRPC stubs from packages/proto/proto
	$(PY) packages/proto/tools/generate_stubs.py

serve-rewards: $(STAMP) ## Serve rewards from CONFIG (default services/rewards.yaml)
	$(VENV)/bin/dancegrpo-rewards serve --config $(CONFIG)

demo: $(STAMP) ## CPU demo: reward service + tiny policy GRPO, no downloads (writes runs/demo/)
	$(PY) -m dancegrpo_trainer.demo

train: $(STAMP) ## Train with TRAIN_CONFIG (default configs/demo.yaml); ARGS="key=value ..."
	$(VENV)/bin/dancegrpo-train --config $(TRAIN_CONFIG) $(ARGS)

test: $(STAMP) ## Run every test (CPU, offline)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## Side-by-side ratio benchmarks -> benchmarks/RESULTS.md (ARGS="--only p4")
	$(PY) benchmarks/run_all.py $(ARGS)

check-deploy: $(STAMP) ## Offline: hadolint the Dockerfile, validate compose and the rendered k8s manifests
	$(PY) services/check_deploy.py

lock-groups: $(STAMP) ## Re-pin each reward group's image (services/groups/*/requirements.lock; needs PyPI)
	$(PY) services/groups/lock.py

clean: ## Remove build artefacts (keeps .venv)
	rm -rf build dist .pytest_cache .ruff_cache runs
