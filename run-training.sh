#!/usr/bin/env bash
# Fine-tune a converted model with LoRA on the shipped dataset (data/), then test it.
#
# Settings, as environment variables (default in brackets):
#   MODEL          converted model folder                       [mlx_model, else the shipped base_model]
#   DATA           folder with train/valid/test.jsonl           [data]
#   ADAPTER_FILE   where the adapters are written               [adapters/adapters.npz]
#   ITERS          training steps                               [600]
#   BATCH_SIZE     examples per step                            [4]
#   LORA_LAYERS    final layers to adapt                        [16]
#   LORA_RANK      rank of the LoRA matrices                    [16]
#   LORA_TARGETS   linears to adapt                             [all]
#   LEARNING_RATE  Adam learning rate                           [1e-3]
# The defaults suit the small shipped model (about 4 minutes on a 2-core CPU); for a 7B model
# use the example's LEARNING_RATE=1e-5 and LORA_TARGETS=wq,wv.
#   PYTHON         interpreter                                  [python3]
# Extra arguments go to lora.py and win over the variables, e.g.
#   ./run-training.sh --lora-rank 16 --lora-targets all --mask-prompt
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
exec "$PYTHON" lora.py --model "${MODEL:-mlx_model}" --train --test \
  --data "${DATA:-data}" \
  --adapter-file "${ADAPTER_FILE:-adapters/adapters.npz}" \
  --iters "${ITERS:-600}" \
  --batch-size "${BATCH_SIZE:-4}" \
  --lora-layers "${LORA_LAYERS:-16}" \
  --lora-rank "${LORA_RANK:-16}" \
  --lora-targets "${LORA_TARGETS:-all}" \
  --learning-rate "${LEARNING_RATE:-1e-3}" \
  "$@"
