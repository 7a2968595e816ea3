#!/usr/bin/env bash
# Fine-tune a converted model with LoRA on the shipped dataset (data/), then test it.
#
# Settings, as environment variables (default in brackets):
#   MODEL          converted model folder                       [mlx_model]
#   DATA           folder with train/valid/test.jsonl           [data]
#   ADAPTER_FILE   where the adapters are written               [adapters/adapters.npz]
#   ITERS          training steps                               [1000]
#   BATCH_SIZE     examples per step                            [4]
#   LORA_LAYERS    final layers to adapt                        [16]
#   LEARNING_RATE  Adam learning rate                           [1e-5]
#   PYTHON         interpreter                                  [python3]
# Extra arguments go to lora.py and win over the variables, e.g.
#   ./run-training.sh --lora-rank 16 --lora-targets all --mask-prompt
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-mlx_model}

if [ ! -d "$MODEL" ] && [ "$MODEL" = mlx_model ]; then
  # Until a pretrained base model ships with the repository, demonstrate the pipeline on
  # a tiny checkpoint with RANDOM weights: it trains, but it knows no language.
  echo "No $MODEL folder: writing an UNTRAINED demo LLaMA checkpoint (random weights) and converting it." >&2
  rm -rf demo_checkpoint
  "$PYTHON" tests/checkpoints.py demo_checkpoint
  "$PYTHON" convert.py --torch-path demo_checkpoint --mlx-path "$MODEL" --dtype float32
fi

exec "$PYTHON" lora.py --model "$MODEL" --train --test \
  --data "${DATA:-data}" \
  --adapter-file "${ADAPTER_FILE:-adapters/adapters.npz}" \
  --iters "${ITERS:-1000}" \
  --batch-size "${BATCH_SIZE:-4}" \
  --lora-layers "${LORA_LAYERS:-16}" \
  --learning-rate "${LEARNING_RATE:-1e-5}" \
  "$@"
