#!/usr/bin/env bash
# Fine-tune the default model (SmolLM2-135M-Instruct, 4-bit: QLoRA) on the shipped chat dataset
# (data/: questions and answers about MLX's API), then test it. About 5 minutes on a 2-core Xeon with AMX.
#
# Settings, as environment variables (default in brackets):
#   MODEL           converted model folder                  [checkpoints/SmolLM2-135M-Instruct, from setup.sh]
#   DATA            folder with train/valid/test.jsonl      [data]
#   ADAPTER_FILE    where the adapters are written          [adapters/adapters.npz]
#   ITERS           training steps                          [240: about two passes over the data]
#   BATCH_SIZE      conversations per step                  [4]
#   LORA_LAYERS     final layers to adapt                   [30: all of SmolLM2's]
#   LORA_RANK       rank of the LoRA matrices               [16]
#   LORA_TARGETS    linears to adapt                        [all]
#   LEARNING_RATE   peak Adam learning rate (cosine decay)  [1e-3]
#   MAX_SEQ_LENGTH  tokens per conversation at most         [128: the answer's name and first lines]
#   COMPUTE_DTYPE   --compute-dtype                         [bfloat16 where the CPU has AMX tiles
#                                                            (products in bfloat16, the rest float32),
#                                                            else auto (float32 on the CPU)]
# For a 7B model use the example's LEARNING_RATE=1e-5 and LORA_TARGETS=wq,wv.
#   TRAIN_MODE      sft; or dpo / orpo, after the sft run   [sft]
#   PYTHON          interpreter                             [python3]
# TRAIN_MODE=dpo (or orpo) is the second step of the worked example (README): preference pairs in
# data-preference/ (written by cwk_create_dataset.py --format preference when missing), starting
# from the sft run's adapters (SFT_ADAPTER_FILE, [adapters/adapters.npz]; for dpo also the
# reference), into adapters/adapters-$TRAIN_MODE.npz; its
# defaults: ITERS 120, BATCH_SIZE 4 pairs, --beta 0.1, LEARNING_RATE 1e-4, and for dpo --sft-weight 10
# (the chosen answers' NLL beside DPO, as ORPO's loss has it: without it DPO made the answers
# worse; README).
# Extra arguments go to lora.py and win over the variables, e.g.
#   ./run-training.sh --lora-rank 8 --iters 400
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ -z "${COMPUTE_DTYPE:-}" ]; then
  COMPUTE_DTYPE=$("$PYTHON" -c "import ops; print('bfloat16' if ops.bfloat16_products_available() else 'auto')")
fi
MODE=${TRAIN_MODE:-sft}
case $MODE in
  sft) mode_args=() ;;
  dpo|orpo)
    DATA=${DATA:-data-preference}
    [ -f "$DATA/train.jsonl" ] || "$PYTHON" cwk_create_dataset.py --format preference --out "$DATA"
    ADAPTER_FILE=${ADAPTER_FILE:-adapters/adapters-$MODE.npz}
    ITERS=${ITERS:-120}
    LEARNING_RATE=${LEARNING_RATE:-1e-4}
    mode_args=(--train-mode "$MODE" --beta 0.1 --resume-adapter-file "${SFT_ADAPTER_FILE:-adapters/adapters.npz}")
    [ "$MODE" = orpo ] || mode_args+=(--sft-weight 10) ;;
  *) echo "run-training.sh: TRAIN_MODE must be sft, dpo or orpo, not $MODE" >&2; exit 2 ;;
esac
exec "$PYTHON" lora.py --model "${MODEL:-checkpoints/SmolLM2-135M-Instruct}" --train --test \
  --data "${DATA:-data}" \
  --adapter-file "${ADAPTER_FILE:-adapters/adapters.npz}" \
  --iters "${ITERS:-240}" \
  --batch-size "${BATCH_SIZE:-4}" \
  --lora-layers "${LORA_LAYERS:-30}" \
  --lora-rank "${LORA_RANK:-16}" \
  --lora-alpha 32 \
  --lora-targets "${LORA_TARGETS:-all}" \
  --learning-rate "${LEARNING_RATE:-1e-3}" --lr-schedule cosine --warmup 20 \
  --max-seq-length "${MAX_SEQ_LENGTH:-128}" \
  --compute-dtype "$COMPUTE_DTYPE" \
  --steps-per-report 20 --steps-per-eval 120 --val-batches 8 --test-batches -1 --save-every 60 \
  ${mode_args[@]+"${mode_args[@]}"} "$@"  # (bash 3.2, macOS's, calls an empty array unset)
