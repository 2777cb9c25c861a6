#!/usr/bin/env bash
# Create benchmarks/.venv-trl112: the peer for benchmarks/ppo_vs_trl.py, trl 1.12.0 (the last TRL with a
# PPOTrainer, in trl.experimental.ppo) beside the same torch and transformers as ours. Idempotent: a venv
# whose stamp matches the pins is left alone. torch is pinned exactly so that pip takes the CPU wheel on
# this machine's disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
VENV=.venv-trl112
PINS=(torch==2.13.0 trl==1.12.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0)
STAMP="$VENV/.installed"

if [[ -f $STAMP && "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
    echo "$VENV is up to date (${PINS[*]})"
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -c "import torch, trl; assert not torch.version.cuda, 'CUDA torch pulled in'; \
from trl.experimental.ppo import PPOTrainer; print('peer ready: torch', torch.__version__, 'trl', trl.__version__)"
echo "${PINS[*]}" >"$STAMP"
