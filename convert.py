"""Convert a checkpoint into an MLX model folder, tensor by tensor.

    python convert.py --hf-path Llama-3.2-1B-Instruct --mlx-path mlx_model [-q] [--dtype float16]
    python convert.py --hf-path SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path mlx_model

Input (formats/, detected from the folder's files or a .gguf path): Meta's and
Mistral's consolidated.NN.pth or consolidated.safetensors with params.json,
Hugging Face folders (config.json with safetensors shards or pytorch_model*.bin),
and GGUF files. Output: config.json, weights.npz (or weights.safetensors), the
tokenizer's files and the chat template. The input is memory-mapped and each
tensor is converted and written as soon as it is read, so memory stays around one
tensor whatever the model size. Everything is checked before anything big is
written, and the output appears only when complete.

Weights keep their stored type unless --dtype says otherwise; GGUF's Q8_0, Q4_0
and Q4_1 stay quantized, as MLX's 8- and 4-bit affine quantization in groups of
32 (exactly the same values), unless -q or --dtype re-decide; a linear's Q6_K
stays in its own blocks (formats/gguf/kquants.py).
"""

import collections
import math
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

import utils  # (before mlx.core: loads a fast BLAS)
from utils import UserError, folder_replaced_when_done, run_script, write_json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

import models
import ops
import settings
from formats import QUANT_BITS, QUANT_GROUP_SIZES, all_finite_bits, open_checkpoint
from formats.mlx import GGUF_TYPE, gguf_types_entry
from formats.safetensors import raw_bytes, write_file
from settings import option

DTYPES = ("float32", "float16", "bfloat16")
# .npy's descr of each array type (bfloat16 as "<V2", as mx.savez writes it).
NPY_DESCR = {mx.float32: "<f4", mx.float16: "<f2", mx.bfloat16: "<V2", mx.uint32: "<u4", mx.uint8: "|u1"}
# The type of dequantized weights when --dtype leaves it open: exact for 4- and 8-bit codes
# times float16 scales.
DEQUANTIZED_DTYPE = "float16"


def quantized_names(key):
    """The three arrays a quantized `key` becomes: packed weight, scales, biases."""
    base = key.removesuffix(".weight")
    return key, base + ".scales", base + ".biases"


def blocks_name(key):
    """The array a weight kept in GGUF blocks becomes (models.BlockQuantizedLinear's)."""
    return key.removesuffix(".weight") + ".blocks"


def linear_weights(config):
    """The weight keys of the model's linear layers (its embeddings are not: a lookup needs rows).
    The model is built without its weights (MLX is lazy: nothing is allocated)."""
    model = models.build(models.model_args(config))
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}


class Plan:
    """What each weight becomes, decided before anything is written.

    how[key]: "copy" (a float in dtype[key]), "quantize" (MLX quantizes it, in groups
    and bits q[key]), "keep" (the file's own quantization, exactly MLX's, kept) or "blocks"
    (a linear's GGUF blocks kept as they are, of type blocks[key]: Q6_K, which MLX cannot hold).
    """

    def __init__(self, checkpoint, dtype, q):
        self.checkpoint, self.how, self.dtype, self.q, self.blocks = checkpoint, {}, {}, {}, {}
        block_type = getattr(checkpoint, "block_type", None)  # formats without GGUF blocks: None
        linears = linear_weights(checkpoint.config) if block_type else set()
        for key, shape in checkpoint.shapes.items():
            source_q = checkpoint.quantization(key)
            stored = checkpoint.stored_dtype(key) or DEQUANTIZED_DTYPE
            self.dtype[key] = dtype or stored
            if q is not None and len(shape) == 2 and shape[-1] % q[0] == 0:  # matrices, never the norms
                self.how[key], self.q[key] = "quantize", q
            elif q is None and dtype is None and key in linears and block_type(key):
                self.how[key], self.blocks[key] = "blocks", block_type(key)
            elif q is None and dtype is None and source_q is not None:
                self.how[key], self.q[key] = "keep", source_q
            else:
                self.how[key] = "copy"

    def arrays(self):
        """(name, mx dtype, shape) of every array to write, in order."""
        out = []
        for key, shape in self.checkpoint.shapes.items():
            dtype = getattr(mx, self.dtype[key])
            if self.how[key] == "copy":
                out.append((key, dtype, shape))
                continue
            if self.how[key] == "blocks":
                values, nbytes = ops.BLOCK_TYPES[self.blocks[key]]
                out.append((blocks_name(key), mx.uint8, (shape[0], shape[1] // values * nbytes)))
                continue
            group_size, bits = self.q[key]
            rows, cols = shape
            groups = (rows, cols // group_size)
            dtype = self.scales_dtype(key)
            out += zip(quantized_names(key), (mx.uint32, dtype, dtype), ((rows, cols * bits // 32), groups, groups))
        return out

    def scales_dtype(self, key):
        """The mx dtype of a quantized weight's scales and biases: a kept one's are the file's,
        as quantized() gives them."""
        if self.how[key] == "keep":
            return self.checkpoint.quantized_scales_dtype(key)
        return getattr(mx, self.dtype[key])

    def quantization_config(self):
        """config.json's quantization block: the commonest (group_size, bits) as the default,
        every module quantized otherwise under its own path, and every one kept in GGUF blocks
        under its path with its type ({"gguf_type": "Q6_K"})."""
        chosen = {key.removesuffix(".weight"): q for key, q in self.q.items()}
        block = {}
        if chosen:
            default = collections.Counter(chosen.values()).most_common(1)[0][0]
            block = {"group_size": default[0], "bits": default[1]}
            block.update({path: {"group_size": q[0], "bits": q[1]} for path, q in chosen.items() if q != default})
        block.update({key.removesuffix(".weight"): {GGUF_TYPE: t} for key, t in self.blocks.items()})
        return block or None

    def converted(self, key):
        """Yield (name, mx.array) of what `key` becomes."""
        checkpoint = self.checkpoint
        if self.how[key] == "keep":
            yield from zip(quantized_names(key), checkpoint.quantized(key))
            return
        if self.how[key] == "blocks":
            yield blocks_name(key), checkpoint.gguf_blocks(key)
            return
        dtype = getattr(mx, self.dtype[key])
        if self.how[key] == "copy":
            yield key, finite(checkpoint.tensor(key).astype(dtype), checkpoint, key, self.dtype[key])
            return
        w = finite(checkpoint.tensor(key).astype(mx.float32), checkpoint, key, "float32")  # quantized from float32
        wq, scales, biases = mx.quantize(w, group_size=self.q[key][0], bits=self.q[key][1])
        yield from zip(quantized_names(key), (wq, scales.astype(dtype), biases.astype(dtype)))


def finite(array, checkpoint, key, dtype):
    """`array`, checked to hold no NaN or infinity (a value beyond float16's range becomes one).
    Read off the exponent bits: MLX's isfinite is one core, a fifth of the conversion's time."""
    bits = np.asarray(array.view(mx.uint32 if array.itemsize == 4 else mx.uint16))
    if not all_finite_bits(bits, dtype):
        raise UserError(f"{checkpoint.path}: {key} is not finite in {dtype}: NaN, infinity, or values beyond "
                        "that type's range (try --dtype bfloat16 or float32)")
    return array


class NpzWriter:
    """Stream arrays into an uncompressed .npz, one `name.npy` member at a time (as mx.savez writes)."""

    def __init__(self, path):
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)

    def write(self, name, array):
        header = {"descr": NPY_DESCR[array.dtype], "fortran_order": False, "shape": tuple(array.shape)}
        with self.zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(raw_bytes(array))

    def close(self):
        try:
            self.zip.close()
        except OSError:
            self.zip.fp = None  # already failed: nothing left for its finalizer to flush
            raise


def prepare_output(mlx_path, source_path, force):
    mlx_path = os.path.abspath(mlx_path)
    if os.path.exists(mlx_path):
        if os.path.samefile(source_path, mlx_path):
            raise UserError(f"{mlx_path}: the output folder must differ from the checkpoint's")
        if not os.path.isdir(mlx_path):
            raise UserError(f"{mlx_path}: exists and is not a folder")
        if os.listdir(mlx_path) and not force:
            raise UserError(f"{mlx_path}: output folder exists and is not empty (use --force to replace it)")
    parent = os.path.dirname(mlx_path)
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: parent folder of --mlx-path does not exist")
    return mlx_path


def convert(source_path, mlx_path, quantize=False, q_group_size=64, q_bits=4, dtype=None, fmt="npz",
            force=False):
    """Convert the checkpoint at `source_path` into the MLX model folder `mlx_path`; return the config.

    dtype None keeps each weight's stored type (and a GGUF file's quantization)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt not in ("npz", "safetensors"):
        raise UserError(f"--format must be npz or safetensors, got {fmt!r}")
    if quantize and (q_bits not in QUANT_BITS or q_group_size not in QUANT_GROUP_SIZES):
        raise UserError(f"quantization needs bits in {QUANT_BITS} and group size in {QUANT_GROUP_SIZES}")
    if not os.path.exists(source_path):
        raise UserError(f"{source_path}: checkpoint folder not found")
    mlx_path = prepare_output(mlx_path, source_path, force)

    # Plan: every shape is checked before anything big is written.
    checkpoint = open_checkpoint(source_path)
    plan = Plan(checkpoint, dtype, (q_group_size, q_bits) if quantize else None)
    need = sum(math.prod(s) * d.size for _, d, s in plan.arrays())
    free = shutil.disk_usage(os.path.dirname(mlx_path)).free
    if need > free:
        raise UserError(f"{os.path.dirname(mlx_path)}: the model needs {utils.human_bytes(need)} of disk, "
                        f"{utils.human_bytes(free)} are free")
    _say_what_changes(checkpoint, plan, (q_group_size, q_bits) if quantize else None)

    # Stream into a temporary folder beside the output; rename it into place only when complete.
    with utils.claimed_output(mlx_path), folder_replaced_when_done(mlx_path) as tmp:
        return write_folder(plan, tmp, fmt)


def write_folder(plan, folder, fmt="npz"):
    """Write what `plan` makes of its checkpoint into `folder` (empty): weights, tokenizer,
    config.json. Returns the config."""
    checkpoint = plan.checkpoint
    config = dict(checkpoint.config)
    config["dtype"] = _commonest(plan.dtype.values())
    if plan.quantization_config():
        config["quantization"] = plan.quantization_config()
    config.update(gguf_types_entry(checkpoint, [key for key, how in plan.how.items() if how == "keep"]))
    write_weights(os.path.join(folder, f"weights.{fmt}"), fmt, plan, plan.arrays())
    checkpoint.write_tokenizer(folder)
    write_json(os.path.join(folder, "config.json"), config)
    return config


def _commonest(values):
    return collections.Counter(values).most_common(1)[0][0]


def _say_what_changes(checkpoint, plan, q):
    """One line per GGUF type: its weights' count and what they became; one for matrices -q leaves in
    floats because their rows do not split into its groups; none at all quantized is an error rather
    than a float model called quantized."""
    if hasattr(checkpoint, "held_as"):
        became = collections.Counter((checkpoint.gguf_type(key), _became(checkpoint, plan, key))
                                     for key in checkpoint.shapes)
        for (gguf_type, what), count in sorted(became.items()):
            print(f"note: {count} {gguf_type} weights: {what}", file=sys.stderr)
    if q is None:
        return
    matrices = [key for key, shape in checkpoint.shapes.items() if len(shape) == 2]
    floats = [key for key in matrices if plan.how[key] != "quantize"]
    if floats == matrices:
        raise UserError(f"-q: no weight's rows split into groups of {q[0]} (rows of "
                        f"{checkpoint.shapes[floats[0]][1]} values, say): choose another --q-group-size")
    if floats:
        print(f"note: {len(floats)} matrices stay {plan.dtype[floats[0]]}: their rows of "
              f"{checkpoint.shapes[floats[0]][1]} values (say) do not split into groups of {q[0]}", file=sys.stderr)


def _became(checkpoint, plan, key):
    """What the plan makes of a GGUF file's weight, in words."""
    if plan.how[key] == "keep":
        return checkpoint.held_as(key)
    if plan.how[key] == "quantize":
        return f"{plan.q[key][1]}-bit groups of {plan.q[key][0]} (-q)"
    if plan.how[key] == "blocks":
        return f"{plan.blocks[key]} blocks (exact)"
    return plan.dtype[key] + (" (dequantized)" if checkpoint.stored_dtype(key) is None else "")


def write_weights(path, fmt, plan, arrays):
    """The plan's arrays into weights.npz or weights.safetensors, one tensor at a time."""
    converted = ((name, array) for key in tqdm(plan.checkpoint.shapes, desc="converting", unit="tensor",
                                               file=sys.stderr, disable=None)
                 for name, array in plan.converted(key))
    if fmt == "safetensors":
        write_file(path, arrays, (array for _, array in converted))
    else:
        writer = NpzWriter(path)
        try:
            for name, array in converted:
                writer.write(name, array)
        finally:
            writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass
class ConvertSettings(settings.Settings):
    torch_path: str = option(None, "the checkpoint: a Meta, Mistral or Hugging Face folder, or a .gguf file",
                             flags=["--hf-path"], required=True)
    mlx_path: str = option("mlx_model", "folder to write the MLX model to (config.json, weights, tokenizer)")
    quantize: bool = option(False, "quantize linear and embedding weights (MLX affine quantization)", flags=["-q"])
    q_group_size: int = option(64, "group size for quantization", choices=QUANT_GROUP_SIZES)
    q_bits: int = option(4, "bits per weight for quantization", choices=QUANT_BITS)
    dtype: Optional[str] = option(None, "type of the stored weights (and of quantization scales and biases); "
                                        "default: as the checkpoint stores them", choices=DTYPES)
    format: str = option("npz", "weights file: weights.npz or weights.safetensors", choices=["npz", "safetensors"])
    force: bool = option(False, "replace a non-empty --mlx-path (only once the new model is complete)")


def main(argv=None):
    args = settings.parse(ConvertSettings, argv, "Convert a checkpoint to an MLX model folder.")
    config = convert(args.torch_path, args.mlx_path, args.quantize, args.q_group_size, args.q_bits,
                     args.dtype, args.format, args.force)
    print(f"wrote {args.mlx_path}: {config['n_layers']} layers, dim {config['dim']}, {config['dtype']}"
          + (f", {args.q_bits}-bit" if args.quantize else "")
          + (", quantized as the file was" if "quantization" in config and not args.quantize else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
