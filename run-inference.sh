#!/usr/bin/env bash
# Generate with the fine-tuned adapters (written by run-training.sh).
#
# Settings, as environment variables (default in brackets):
#   MODEL          converted model folder                       [mlx_model, else the shipped base_model]
#   ADAPTER_FILE   adapters to apply                            [adapters/adapters.npz]
#   PROMPT         the prompt                                   ["Q: What is ReLU in mlx?" + newline + "A:"]
#   MAX_TOKENS     tokens to generate at most                   [100]
#   TEMP           sampling temperature, 0 = greedy             [0]
#   PYTHON         interpreter                                  [python3]
# Extra arguments go to lora.py and win over the variables, e.g.
#   ./run-inference.sh --temp 0.7 --top-p 0.9
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

exec "$PYTHON" lora.py --model "${MODEL:-mlx_model}" \
  --adapter-file "${ADAPTER_FILE:-adapters/adapters.npz}" \
  --prompt "${PROMPT:-$'Q: What is ReLU in mlx?\nA:'}" \
  --max-tokens "${MAX_TOKENS:-100}" \
  --temp "${TEMP:-0}" \
  "$@"
