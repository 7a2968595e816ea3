"""Safetensors files: reading one (its header checked against the file, its tensors
memory-mapped), and writing one a tensor at a time.

Layout: an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data, offsets counted from its start. The header comes from a stranger:
its length, every shape and every offset are checked against the file before
anything is mapped.
"""

import json
import math
import os
import struct

import numpy as np

from utils import UserError, parse_json

import mlx.core as mx

MAX_HEADER_BYTES = 100 * 2**20
MAX_DIMS = 8
# The float types a checkpoint's weights come in: numpy's view of the bytes, and the type's name.
DTYPES = {"F32": (np.float32, "float32"), "F16": (np.float16, "float16"), "BF16": (np.uint16, "bfloat16")}
WRITTEN_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}


class SafetensorsFile:
    """tensors: {name: (dtype name, shape)}; array(name) -> mx.array, memory-mapped until then."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{path}: not a safetensors file (a header of {n} bytes in a file of {size})")
            raw = f.read(n)
        header = parse_json(raw, f"{path}: header")
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
        self.data_start, data_bytes = 8 + n, size - 8 - n
        self._entries = {name: self._entry(name, info, data_bytes)
                         for name, info in header.items() if name != "__metadata__"}
        self._check_disjoint()
        self.tensors = {name: (dtype, shape) for name, (dtype, shape, _, _) in self._entries.items()}

    def _entry(self, name, info, data_bytes):
        """(dtype name, shape, begin, end) of one tensor, every field checked."""
        where = f"{self.path}: {name}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise UserError(f"{where}: header entry without dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise UserError(f"{where}: dtype {info['dtype']!r} is not a weight type this toolkit reads "
                            f"({', '.join(DTYPES)})")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
            raise UserError(f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
            raise UserError(f"{where}: data_offsets {offsets!r} are not two byte offsets")
        begin, end = offsets
        numpy_type, name_of_dtype = DTYPES[info["dtype"]]
        if not begin <= end <= data_bytes:
            raise UserError(f"{where}: its data [{begin}, {end}) lies outside the file's {data_bytes} data bytes "
                            "(truncated?)")
        if end - begin != math.prod(shape) * np.dtype(numpy_type).itemsize:
            raise UserError(f"{where}: {end - begin} bytes of data for a {info['dtype']} tensor of shape {shape}")
        return name_of_dtype, tuple(shape), begin, end

    def _check_disjoint(self):
        """No two tensors share bytes: one range read as two weights is a forged file."""
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self._entries.items())
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise UserError(f"{self.path}: {second} overlaps the bytes of {first}")

    def array(self, name):
        """The tensor as an mx.array of its own float type."""
        dtype_name, shape, begin, _ = self._entries[name]
        numpy_type = DTYPES[next(k for k, v in DTYPES.items() if v[1] == dtype_name)][0]
        if math.prod(shape) == 0:
            data = np.zeros(shape, numpy_type)
        else:
            data = np.memmap(self.path, dtype=numpy_type, mode="r", offset=self.data_start + begin, shape=shape)
        out = mx.array(data)
        return out.view(mx.bfloat16) if dtype_name == "bfloat16" else out


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def write_file(path, entries, arrays):
    """Write a safetensors file: `entries` [(name, mx dtype, shape)] first, as the header, then
    each of `arrays` (in the same order) as it comes, so one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.size
        header[name] = {"dtype": WRITTEN_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, dtype, shape), array in zip(entries, arrays):
            assert array.dtype == dtype and tuple(array.shape) == tuple(shape), (name, array.dtype, array.shape)
            f.write(raw_bytes(array))


def raw_bytes(array):
    """An mx.array's bytes in row order (bfloat16, which numpy lacks, as its 16-bit patterns)."""
    bits = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    return memoryview(np.ascontiguousarray(np.asarray(bits))).cast("B")
