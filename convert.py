"""Convert a checkpoint into an MLX model folder, tensor by tensor.

    python convert.py --torch-path llama-2-7b --mlx-path mlx_model [-q] [--dtype float16]

Input: a checkpoint folder in any format of formats/ (today Meta's and
Mistral's consolidated.NN.pth + params.json + tokenizer.model). Output:
config.json, weights.npz (or weights.safetensors) and the tokenizer's files.
The input is memory-mapped and each tensor is converted and written as soon as
it is read, so memory stays around one tensor whatever the model size.
Everything is checked before anything big is written, and the output appears
only when complete.
"""

import json
import math
import os
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass

import utils  # (before mlx.core: loads a fast BLAS)
from utils import UserError, folder_replaced_when_done, run_cli, write_json

import mlx.core as mx
import numpy as np
import torch
from tqdm import tqdm

import settings
from formats import module_name, open_checkpoint
from loading import Q_BITS, Q_GROUP_SIZES
from settings import option

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# bfloat16 is stored as "<V2" in .npy, exactly as mx.savez writes it (mx.load reads it back as bfloat16).
NPY_DESCR = {torch.float16: "<f2", torch.bfloat16: "<V2", torch.float32: "<f4", torch.uint32: "<u4"}
ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint32: "U32"}
# Every linear layer and the embedding; never the norms.
QUANTIZABLE = {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "output", "tok_embeddings"}

def is_quantized(key, shape, q):
    """Linear and embedding weights whose full last dim holds whole groups; q = (group_size, bits) or None."""
    return q is not None and module_name(key) in QUANTIZABLE and shape[-1] % q[0] == 0


def quantized_names(key):
    """The three arrays a quantized `key` becomes: packed weight, scales, biases."""
    base = key.removesuffix(".weight")
    return key, base + ".scales", base + ".biases"


def plan_outputs(shapes, dtype, q):
    """(name, dtype, shape) of every array to write, in order."""
    out = []
    for key, shape in shapes.items():
        if is_quantized(key, shape, q):
            rows, cols = shape
            out += zip(quantized_names(key), (torch.uint32, dtype, dtype),
                       ((rows, cols * q[1] // 32), (rows, cols // q[0]), (rows, cols // q[0])))  # packed
        else:
            out.append((key, dtype, shape))
    return out


def convert_tensor(checkpoint, key, shape, dtype, q):
    """Yield (name, torch tensor) for one checkpoint key of full `shape`: as is, or quantized."""
    if is_quantized(key, shape, q):
        w32 = finite(checkpoint.tensor(key, torch.float32), checkpoint, key, torch.float32)  # quantized from float32
        w = mx.array(w32.numpy())
        del w32
        wq, scales, biases = mx.quantize(w, group_size=q[0], bits=q[1])
        del w
        packed = torch.from_numpy(np.array(wq))  # uint32, 32 // bits weights per word
        yield from zip(quantized_names(key), (packed, torch.from_numpy(np.array(scales)).to(dtype),
                                              torch.from_numpy(np.array(biases)).to(dtype)))
    else:
        yield key, finite(checkpoint.tensor(key, dtype), checkpoint, key, dtype)


def finite(tensor, checkpoint, key, dtype):
    """`tensor`, checked to hold no NaN or infinity (a value beyond float16's range becomes one)."""
    if not torch.isfinite(tensor).all():
        raise UserError(f"{checkpoint.path}: {key} is not finite in {str(dtype).removeprefix('torch.')}: NaN, infinity, or values "
                        "beyond that type's range (try --dtype bfloat16 or float32)")
    return tensor


def raw_bytes(tensor):
    # bfloat16 has no numpy type: write its bits (uint16) unchanged.
    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


class NpzWriter:
    """Stream arrays into an uncompressed .npz, one `name.npy` member at a time (as mx.savez writes)."""

    def __init__(self, path):
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)

    def write(self, name, tensor):
        header = {"descr": NPY_DESCR[tensor.dtype], "fortran_order": False, "shape": tuple(tensor.shape)}
        with self.zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(raw_bytes(tensor))

    def close(self):
        try:
            self.zip.close()
        except OSError:
            self.zip.fp = None  # already failed: nothing left for its finalizer to flush
            raise


class SafetensorsWriter:
    """Write the header from the plan first, then stream each array's bytes in plan order."""

    def __init__(self, path, plan):
        header, offset = {}, 0
        for name, dtype, shape in plan:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.plan = iter(plan)

    def write(self, name, tensor):
        want = next(self.plan)
        assert (name, tensor.dtype, tuple(tensor.shape)) == (want[0], want[1], tuple(want[2])), (name, want)
        self.file.write(raw_bytes(tensor))

    def close(self):
        self.file.close()


def prepare_output(mlx_path, torch_path, force):
    mlx_path = os.path.abspath(mlx_path)
    if os.path.exists(mlx_path):
        if os.path.samefile(torch_path, mlx_path):
            raise UserError(f"{mlx_path}: the output folder must differ from --torch-path")
        if not os.path.isdir(mlx_path):
            raise UserError(f"{mlx_path}: exists and is not a folder")
        if os.listdir(mlx_path) and not force:
            raise UserError(f"{mlx_path}: output folder exists and is not empty (use --force to replace it)")
    parent = os.path.dirname(mlx_path)
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: parent folder of --mlx-path does not exist")
    return mlx_path


def convert(torch_path, mlx_path, quantize=False, q_group_size=64, q_bits=4, dtype="float16",
            fmt="npz", force=False):
    """Convert the checkpoint folder `torch_path` into the MLX model folder `mlx_path`; return the config."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt not in ("npz", "safetensors"):
        raise UserError(f"--format must be npz or safetensors, got {fmt!r}")
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise UserError(f"quantization needs bits in {Q_BITS} and group size in {Q_GROUP_SIZES}")
    if not os.path.exists(torch_path):
        raise UserError(f"{torch_path}: checkpoint folder not found")
    mlx_path = prepare_output(mlx_path, torch_path, force)

    # Plan: every shape is checked before anything big is written.
    checkpoint = open_checkpoint(torch_path)
    config, shapes = dict(checkpoint.config), checkpoint.shapes
    out_dtype = DTYPES[dtype]
    q = (q_group_size, q_bits) if quantize else None
    plan = plan_outputs(shapes, out_dtype, q)
    config["dtype"] = dtype
    if q:
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
    need = sum(math.prod(s) * d.itemsize for _, d, s in plan)
    free = shutil.disk_usage(os.path.dirname(mlx_path)).free
    if need > free:
        raise UserError(f"{os.path.dirname(mlx_path)}: needs {need / 2**30:.1f} GiB free, has {free / 2**30:.1f} GiB")

    # Stream into a temporary folder beside the output; rename it into place only when complete.
    with utils.claimed_output(mlx_path), folder_replaced_when_done(mlx_path) as tmp:
        write_weights(os.path.join(tmp, f"weights.{fmt}"), fmt, plan, checkpoint, shapes, out_dtype, q)
        for path in checkpoint.tokenizer_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        write_json(os.path.join(tmp, "config.json"), config)
    return config


def write_weights(path, fmt, plan, checkpoint, shapes, dtype, q):
    writer = NpzWriter(path) if fmt == "npz" else SafetensorsWriter(path, plan)
    try:
        for key, shape in tqdm(shapes.items(), desc="converting", unit="tensor", file=sys.stderr, disable=None):
            for name, tensor in convert_tensor(checkpoint, key, shape, dtype, q):
                writer.write(name, tensor)
                del tensor
    finally:
        writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass
class ConvertSettings(settings.Settings):
    torch_path: str = option(None, "checkpoint folder (consolidated.NN.pth, params.json, tokenizer.model)",
                             required=True)
    mlx_path: str = option("mlx_model", "folder to write the MLX model to (config.json, weights, tokenizer)")
    quantize: bool = option(False, "quantize linear and embedding weights (MLX affine quantization)", flags=["-q"])
    q_group_size: int = option(64, "group size for quantization", choices=Q_GROUP_SIZES)
    q_bits: int = option(4, "bits per weight for quantization", choices=Q_BITS)
    dtype: str = option("float16", "type of the stored weights (and of quantization scales and biases)",
                        choices=list(DTYPES))
    format: str = option("npz", "weights file: weights.npz or weights.safetensors", choices=["npz", "safetensors"])
    force: bool = option(False, "replace a non-empty --mlx-path (only once the new model is complete)")


def main(argv=None):
    args = settings.parse(ConvertSettings, argv, "Convert a checkpoint to an MLX model folder.")
    config = convert(args.torch_path, args.mlx_path, args.quantize, args.q_group_size, args.q_bits,
                     args.dtype, args.format, args.force)
    print(f"wrote {args.mlx_path}: {config['n_layers']} layers, dim {config['dim']}, {args.dtype}"
          + (f", {args.q_bits}-bit" if args.quantize else ""), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
