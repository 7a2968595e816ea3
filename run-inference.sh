#!/usr/bin/env bash
# Ask the fine-tuned default model (adapters from run-training.sh) through its chat template.
#
# Settings, as environment variables (default in brackets):
#   MODEL          converted model folder                   [checkpoints/SmolLM2-135M-Instruct]
#   ADAPTER_FILE   adapters to apply                        [adapters/adapters.npz]
#   PROMPT         the user's question                      ["What is ReLU in mlx?"]
#   MAX_TOKENS     tokens to generate at most               [100]
#   TEMP           sampling temperature, 0 = greedy         [0]
#   PYTHON         interpreter                              [python3]
# Extra arguments go to lora.py and win over the variables, e.g.
#   ./run-inference.sh --temp 0.7 --top-p 0.9 --system "Answer in one line."
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

exec "$PYTHON" lora.py --model "${MODEL:-checkpoints/SmolLM2-135M-Instruct}" \
  --adapter-file "${ADAPTER_FILE:-adapters/adapters.npz}" \
  --chat --prompt "${PROMPT:-What is ReLU in mlx?}" \
  --max-tokens "${MAX_TOKENS:-100}" \
  --temp "${TEMP:-0}" \
  "$@"
