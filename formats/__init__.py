"""Checkpoint formats convert.py reads, one module each, and the layout they all convert into.

    meta.py         Meta's and Mistral's folders: consolidated.NN.pth or consolidated.safetensors
                    with params.json (LLaMA 1/2/3, Code Llama, Mistral)
    hf.py           Hugging Face folders: config.json, safetensors shards (or pytorch_model*.bin)
    gguf/           GGUF files (llama.cpp, Ollama, LM Studio): a package, one module a concern
    protobuf.py     the few pieces of protobuf a SentencePiece model needs (gguf/ writes and reads them)
    mlx.py          this toolkit's own model folders (to quantize or export one again)
    safetensors.py  the safetensors container both of the first two may use

Every format's module offers detect(path) and a Checkpoint(path) class with:
  path          what was opened;
  config        the model folder's config.json keys (models/config.py's CONFIG_KEYS, checked there), and the
                tokenizer's: bos_token_id, eos_token_ids, add_bos_token;
  shapes        {name: shape} of every weight, in this toolkit's names (Meta's) and
                Meta's row order for the queries and keys (RoPE on interleaved pairs);
  stored_dtype(name)   "float32", "float16" or "bfloat16"; None for a quantized tensor;
  tensor(name)         the weight as an mx.array, in its stored float type (float32
                       when the file holds it quantized);
  quantization(name)   (group_size, bits) when the file holds the weight in a form that
                       is exactly MLX's affine quantization (or, GGUF's Q6_K, Q3_K and Q2_K,
                       is held re-quantized to 8 bits: gguf.Checkpoint.held_as), else None;
  quantized(name)      then, (packed uint32 weight, scales, biases) as MLX lays them out;
  quantized_scales_dtype(name)  the mx dtype of those scales and biases (for the plan);
  block_type(name), gguf_blocks(name)  (GGUF and model folders only) the GGUF type whose own blocks
                       hold the weight as they are (Q6_K: ops.BLOCK_TYPES), else None; and those
                       blocks, uint8 [rows, cols / 256 * 210];
  write_tokenizer(folder)  the tokenizer's files and chat template into the new folder.
"""

import importlib
import os

import numpy as np

from utils import UserError

# Where each float type's exponent lies: all ones is infinity or NaN. Read off the raw bits, for
# numpy's speed (MLX's isfinite runs on one core).
EXPONENT_MASKS = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80}


def all_finite_bits(bits, dtype_name):
    """Whether the float values whose raw bits (unsigned integers) are `bits` hold no NaN or infinity."""
    mask = EXPONENT_MASKS[dtype_name]
    return not np.any((bits & mask) == mask)

# MLX's affine quantization: the bit widths and group sizes a model folder may hold.
QUANT_BITS, QUANT_GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)
# Where a checkpoint's module is detected first: a .gguf file, then the folder layouts.
FORMATS = ("gguf", "meta", "mlx", "hf")


def open_checkpoint(path):
    """The Checkpoint of whichever format `path` holds."""
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint folder not found")
    for name in FORMATS:
        module = importlib.import_module(f"formats.{name}")
        if module.detect(path):
            return module.Checkpoint(path)
    raise UserError(f"{path}: no checkpoint here (no consolidated.NN.pth shards with params.json, no "
                    "config.json with safetensors or pytorch_model.bin weights, not a .gguf file)")
