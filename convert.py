"""Convert a Meta / Mistral checkpoint folder into an MLX model folder, tensor by tensor.

    python convert.py --torch-path llama-2-7b --mlx-path mlx_model [-q] [--dtype float16]

Input: consolidated.NN.pth (model-parallel shards are merged), params.json,
tokenizer.model. Output: config.json, weights.npz (or weights.safetensors),
tokenizer.model. Shards are memory-mapped and each tensor is converted and
written as soon as it is read, so memory stays around one tensor whatever the
model size. Everything is checked before anything big is written, and the
output appears only when complete.
"""

import argparse
import glob
import json
import math
import os
import pickle
import shutil
import struct
import sys
import zipfile

import utils  # noqa: F401  (before mlx.core: loads a fast BLAS)
from utils import UserError, folder_replaced_when_done, read_json, run_cli, write_json

import mlx.core as mx
import numpy as np
import torch
from tqdm import tqdm

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# bfloat16 is stored as "<V2" in .npy, exactly as mx.savez writes it (mx.load reads it back as bfloat16).
NPY_DESCR = {torch.float16: "<f2", torch.bfloat16: "<V2", torch.float32: "<f4", torch.uint32: "<u4"}
ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint32: "U32"}
Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)

# Meta's model parallelism: which axis of each weight is split across shards.
SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel
              "wo": 1, "w2": 1, "tok_embeddings": 1}                     # row-parallel
QUANTIZABLE = set(SPLIT_AXIS)  # every linear layer and the embedding; never the norms


def module_name(key):
    return key.split(".")[-2]


def open_shards(folder):
    """Memory-map every consolidated.NN.pth; refuse anything that is not plain tensors."""
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not paths:
        raise UserError(f"{folder}: no consolidated.NN.pth shards found")
    for n, path in enumerate(paths):
        if os.path.basename(path) != f"consolidated.{n:02d}.pth":
            raise UserError(f"{os.path.join(folder, f'consolidated.{n:02d}.pth')}: shard missing "
                            f"(found {len(paths)} shards up to {os.path.basename(paths[-1])})")
    shards = []
    for path in paths:
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not a PyTorch checkpoint: not a zip archive (corrupt or truncated "
                            "file, or torch's legacy pre-1.6 format, which cannot be memory-mapped)")
        try:
            # weights_only: the unpickler accepts tensors and plain containers, nothing that runs code.
            sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            raise UserError(f"{path}: refusing to load it: it contains pickled code/objects not allowed "
                            "in a weights-only checkpoint (it could run arbitrary code)")
        except Exception as e:  # torch raises RuntimeError / OSError / EOFError for damaged files
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {detail}")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{path}: expected a dict of tensors (a Meta state dict)")
        shards.append((path, sd))
    return shards


def _param(params, name, path, kind=int, default=None):
    """params[name], checked to be a positive int (or number); `default` when absent."""
    if name not in params and default is not None:
        return default
    if name not in params:
        raise UserError(f"{path}: missing '{name}'")
    value = params[name]
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value <= 0:
        raise UserError(f"{path}: '{name}' must be a positive {'number' if kind is float else 'integer'}, "
                        f"got {value!r}")
    return kind(value)


def llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def derive_config(params, params_path, shards):
    """The output config: params.json's values, the rest read off shard 00's shapes (checked later)."""
    dim, n_layers, n_heads = (_param(params, k, params_path) for k in ("dim", "n_layers", "n_heads"))
    if "head_dim" in params:
        head_dim = _param(params, "head_dim", params_path)
    elif dim % n_heads:
        raise UserError(f"{params_path}: dim {dim} is not divisible by n_heads {n_heads}")
    else:
        head_dim = dim // n_heads
    n_shards = len(shards)
    path0, sd0 = shards[0]

    def merged_rows(key):
        if key not in sd0:
            raise UserError(f"{path0}: missing key '{key}'")
        return sd0[key].shape[0] * n_shards  # wk and w1: split along rows

    if "n_kv_heads" in params:
        n_kv_heads = _param(params, "n_kv_heads", params_path)
    else:  # LLaMA 1/2 params omit it: read it off wk (checked for every layer later)
        kv_rows = merged_rows("layers.0.attention.wk.weight")
        if kv_rows % head_dim or kv_rows == 0:
            raise UserError(f"{path0}: layers.0.attention.wk.weight has {kv_rows} rows, "
                            f"not a multiple of head_dim {head_dim}")
        n_kv_heads = kv_rows // head_dim
    if n_heads % n_kv_heads:
        raise UserError(f"{params_path}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    hidden_dim = merged_rows("layers.0.feed_forward.w1.weight")
    if "hidden_dim" in params:
        if params["hidden_dim"] != hidden_dim:
            raise UserError(f"{path0}: layers.0.feed_forward.w1.weight has {hidden_dim} rows but "
                            f"{params_path} says hidden_dim {params['hidden_dim']}")
    elif "multiple_of" in params:
        multiplier = params.get("ffn_dim_multiplier")
        if multiplier is not None:
            multiplier = _param(params, "ffn_dim_multiplier", params_path, float)
        expected = llama_hidden_dim(dim, _param(params, "multiple_of", params_path), multiplier)
        if expected != hidden_dim:
            raise UserError(f"{path0}: layers.0.feed_forward.w1.weight has {hidden_dim} rows but "
                            f"{params_path} (multiple_of, ffn_dim_multiplier) gives hidden_dim {expected}")
    if "tok_embeddings.weight" not in sd0:
        raise UserError(f"{path0}: missing key 'tok_embeddings.weight'")
    vocab_size = sd0["tok_embeddings.weight"].shape[0]
    if params.get("vocab_size", -1) not in (-1, vocab_size):  # LLaMA writes -1: "from the tokenizer"
        raise UserError(f"{path0}: tok_embeddings.weight has {vocab_size} rows but "
                        f"{params_path} says vocab_size {params['vocab_size']}")
    window = params.get("sliding_window")  # Mistral; null or absent: full causal attention
    return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "head_dim": head_dim, "hidden_dim": hidden_dim,
            "norm_eps": _param(params, "norm_eps", params_path, float, default=1e-5),
            "vocab_size": vocab_size,
            "rope_theta": _param(params, "rope_theta", params_path, float, default=10000.0),
            "sliding_window": None if window is None else _param(params, "sliding_window", params_path)}


def expected_shapes(c):
    """Every weight the model needs and its full (merged) shape."""
    D, V, C = c["dim"], c["vocab_size"], c["hidden_dim"]
    Q, KV = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (Q, D), p + "attention.wk.weight": (KV, D),
                       p + "attention.wv.weight": (KV, D), p + "attention.wo.weight": (D, Q),
                       p + "feed_forward.w1.weight": (C, D), p + "feed_forward.w2.weight": (D, C),
                       p + "feed_forward.w3.weight": (C, D),
                       p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,)})
    return shapes


def check_shards(shards, shapes):
    """Every shard holds exactly the expected keys, each with its slice's shape; replicas agree."""
    n = len(shards)
    for path, sd in shards:
        keys = set(sd) - {"rope.freqs"}  # old LLaMA checkpoints: RoPE frequencies, not a weight
        for key in sorted(set(shapes) - keys):
            raise UserError(f"{path}: missing key '{key}' (expected from params.json)")
        for key in sorted(keys - set(shapes)):
            raise UserError(f"{path}: unexpected key '{key}' (does params.json match these weights?)")
        for key, shape in shapes.items():
            tensor, want = sd[key], list(shape)
            axis = SPLIT_AXIS.get(module_name(key))
            if axis is not None:
                if want[axis] % n:
                    raise UserError(f"{path}: {key}: size {want[axis]} cannot be split over {n} shards")
                want[axis] //= n
            if tuple(tensor.shape) != tuple(want):
                raise UserError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(want)} "
                                f"from params.json{f' (1/{n} of {shape})' if n > 1 and axis is not None else ''}")
            if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise UserError(f"{path}: {key} has dtype {tensor.dtype}, expected a float type")
    first_path, first = shards[0]
    for path, sd in shards[1:]:  # replicated tensors (norms) are small: compare them now
        for key in shapes:
            if module_name(key) not in SPLIT_AXIS and not torch.equal(sd[key], first[key]):
                raise UserError(f"{path}: {key} differs from {os.path.basename(first_path)}; "
                                "replicated tensors must be identical in every shard")


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


def merged(key, shards, dtype):
    """The full tensor for `key` in `dtype`: each shard's slice is copied straight into place."""
    pieces = [sd[key] for _, sd in shards]
    axis = SPLIT_AXIS.get(module_name(key))
    if axis is None or len(pieces) == 1:
        return pieces[0].to(dtype)  # written out, never changed: no copy needed
    shape = list(pieces[0].shape)
    shape[axis] = sum(p.shape[axis] for p in pieces)
    full = torch.empty(shape, dtype=dtype)
    offset = 0
    for p in pieces:
        full.narrow(axis, offset, p.shape[axis]).copy_(p)  # reads the mapped pages once
        offset += p.shape[axis]
    return full


def convert_tensor(key, shape, shards, dtype, q):
    """Yield (name, torch tensor) for one checkpoint key of full `shape`: as is, or quantized."""
    if is_quantized(key, shape, q):
        w = mx.array(merged(key, shards, torch.float32).numpy())  # quantize from float32 for accuracy
        wq, scales, biases = mx.quantize(w, group_size=q[0], bits=q[1])
        del w
        packed = torch.from_numpy(np.array(wq))  # uint32, 32 // bits weights per word
        yield from zip(quantized_names(key), (packed, torch.from_numpy(np.array(scales)).to(dtype),
                                              torch.from_numpy(np.array(biases)).to(dtype)))
    else:
        yield key, merged(key, shards, dtype)


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
        self.zip.close()


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
    if not os.path.isdir(torch_path):
        raise UserError(f"{torch_path}: checkpoint folder not found")
    mlx_path = prepare_output(mlx_path, torch_path, force)
    params_path = os.path.join(torch_path, "params.json")
    params = read_json(params_path, "params.json")
    tokenizer_path = os.path.join(torch_path, "tokenizer.model")
    if not os.path.isfile(tokenizer_path):
        raise UserError(f"{tokenizer_path}: tokenizer.model not found")

    # Plan: every shape is checked before anything big is written.
    shards = open_shards(torch_path)
    config = derive_config(params, params_path, shards)
    shapes = expected_shapes(config)
    check_shards(shards, shapes)
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
    with folder_replaced_when_done(mlx_path) as tmp:
        weights = os.path.join(tmp, f"weights.{fmt}")
        writer = NpzWriter(weights) if fmt == "npz" else SafetensorsWriter(weights, plan)
        try:
            for key, shape in tqdm(shapes.items(), desc="converting", unit="tensor", file=sys.stderr, disable=None):
                for name, tensor in convert_tensor(key, shape, shards, out_dtype, q):
                    writer.write(name, tensor)
                    del tensor
        finally:
            writer.close()
        with open(weights, "rb") as f:
            os.fsync(f.fileno())
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        write_json(os.path.join(tmp, "config.json"), config)
    return config


def build_parser():
    parser = argparse.ArgumentParser(description="Convert Meta / Mistral weights to MLX.")
    parser.add_argument("--torch-path", type=str, required=True,
                        help="Folder with consolidated.NN.pth, params.json and tokenizer.model.")
    parser.add_argument("--mlx-path", type=str, default="mlx_model",
                        help="Folder to write the MLX model to (config.json, weights, tokenizer.model).")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="Quantize linear and embedding weights (MLX affine quantization).")
    parser.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES,
                        help="Group size for quantization.")
    parser.add_argument("--q-bits", type=int, default=4, choices=Q_BITS,
                        help="Bits per weight for quantization.")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES),
                        help="Type of the stored weights (and of quantization scales and biases).")
    parser.add_argument("--format", dest="fmt", default="npz", choices=["npz", "safetensors"],
                        help="Weights file: weights.npz or weights.safetensors.")
    parser.add_argument("--force", action="store_true",
                        help="Replace a non-empty --mlx-path (only once the new model is complete).")
    return parser


def main():
    args = build_parser().parse_args()
    config = convert(args.torch_path, args.mlx_path, args.quantize, args.q_group_size, args.q_bits,
                     args.dtype, args.fmt, args.force)
    print(f"wrote {args.mlx_path}: {config['n_layers']} layers, dim {config['dim']}, {args.dtype}"
          + (f", {args.q_bits}-bit" if args.quantize else ""), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
