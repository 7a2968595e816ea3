"""The GGUF header, read by a parser of our own: every count and length bounded by the bytes left
before anything is allocated from it, every tensor's bytes inside the file.
"""

import math
import mmap
import os
import struct
from collections import namedtuple
from functools import lru_cache

import numpy as np

from utils import UserError


MAGIC, VERSIONS, DEFAULT_ALIGNMENT, MAX_DIMS = b"GGUF", (2, 3), 32, 4
MAX_NESTING = 4  # arrays of arrays: deeper than any real file, shallow enough for the stack
# The fewest bytes an entry can take: a count is bounded by the bytes left before a loop runs.
MIN_KV_BYTES = 8 + 4 + 1                    # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8   # name length, n_dims, one dim, type, offset
MIN_ARRAY_BYTES = 4 + 8                     # an array inside an array: its type and count
# Python objects outweigh the bytes they come from: counts past any real file's are refused.
MAX_ENTRIES = 1 << 16    # tensors, metadata keys (a llama file has under 10,000 and 100)
MAX_KEPT_ITEMS = 1 << 22  # tokens, merges, scores: the largest vocabulary a model folder may have
# Metadata value types: (struct format, numpy dtype) of the scalars; bools are bytes.
SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
           5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
           12: ("<d", "<f8")}
FLOAT32, STRING, ARRAY = 6, 8, 9
# The arrays the reader uses; it checks and skips the others without building them.
KEPT_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges"}

# ggml types read without the gguf package: id -> (name, values per block, bytes per block).
NATIVE_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
                2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}

Entry = namedtuple("Entry", "gguf_name type block type_size shape start nbytes")


def map_file(path):
    """The whole file, memory-mapped read-only."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < len(MAGIC):
                raise UserError(f"{path}: not a GGUF file (only {os.fstat(f.fileno()).st_size} bytes)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise UserError(f"{path}: GGUF file not found")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})")


class Reader:
    """GGUF's fields read in order off the mapped file, never past its end."""

    def __init__(self, data, path):
        self.data, self.path, self.pos = data, path, 0

    def left(self):
        return len(self.data) - self.pos

    def error(self, message):
        return UserError(f"{self.path}: {message}")

    def skip(self, n, what):
        """The offset of the next `n` bytes, which are passed over."""
        if n > self.left():
            raise self.error(f"{what} runs past the end of the file (truncated?)")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt, what):
        return struct.unpack_from(fmt, self.data, self.skip(struct.calcsize(fmt), what))[0]

    def count(self, n, least_bytes, what, most=None):
        """`n` entries of at least `least_bytes` each, checked to fit in the bytes left (and to be
        at most `most`, where the objects built would outgrow the file's bytes)."""
        if n * least_bytes > self.left():
            raise self.error(f"{what} {n} does not fit in a file of {len(self.data)} bytes")
        if most is not None and n > most:
            raise self.error(f"{what} {n} is more than this reader accepts ({most})")
        return n

    def string(self, what, keep=True):
        n = self.count(self.scalar("<Q", what), 1, f"{what}: string length")
        start = self.skip(n, what)
        if not keep:
            return None
        try:
            return self.data[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not UTF-8 text")

    def value(self, vtype, what, keep=True, depth=0):
        if vtype in SCALARS:
            value = self.scalar(SCALARS[vtype][0], what)
            # float32's shortest decimal (1e-05, not 9.999999747378752e-06): the same float32
            return float(str(np.float32(value))) if vtype == FLOAT32 else value
        if vtype == STRING:
            return self.string(what, keep)
        if vtype == ARRAY:
            return self.array(what, keep, depth)
        raise self.error(f"{what} has value type {vtype}, which GGUF does not define")

    def array(self, what, keep, depth):
        """A numpy array of numbers, or a list of strings or arrays; when not kept, an UnreadArray."""
        if depth >= MAX_NESTING:
            raise self.error(f"{what}: arrays nested more than {MAX_NESTING} deep")
        etype = self.scalar("<I", what)
        n = self.scalar("<Q", what)
        most = MAX_KEPT_ITEMS if keep else None
        if etype in SCALARS:
            dtype = np.dtype(SCALARS[etype][1])
            start = self.skip(self.count(n, dtype.itemsize, f"{what}: array count", most) * dtype.itemsize, what)
            return np.frombuffer(self.data, dtype, n, start).copy() if keep else UnreadArray(n)
        least = {STRING: 8, ARRAY: MIN_ARRAY_BYTES}.get(etype)
        if least is None:
            raise self.error(f"{what} is an array of value type {etype}, which GGUF does not define")
        self.count(n, least, f"{what}: array count", most)
        items = [self.value(etype, f"{what}[{i}]", keep, depth + 1) for i in range(n)]
        return items if keep else UnreadArray(n)


class UnreadArray:
    """An array none of whose values the reader uses: only its length is kept."""

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"an array of {self.n} values"


def read_header(data, path):
    """(metadata {key: value}, tensor infos {name: (dims, type id, offset)}, data offset)."""
    magic = data[:len(MAGIC)]
    if magic != MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {magic!r})")
    r = Reader(data, path)
    r.skip(len(MAGIC), "the magic")
    version = r.scalar("<I", "the version")
    if version not in VERSIONS:
        raise UserError(f"{path}: GGUF version {version} is not supported ({' or '.join(map(str, VERSIONS))})")
    n_tensors = r.scalar("<Q", "the tensor count")
    n_kv = r.scalar("<Q", "the metadata count")
    r.count(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor count", MAX_ENTRIES)
    r.count(n_kv, MIN_KV_BYTES, "metadata count", MAX_ENTRIES)
    meta = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        label = shown(key)
        vtype = r.scalar("<I", label)
        value = r.value(vtype, label, keep=vtype != ARRAY or key in KEPT_ARRAYS)
        if key in meta:
            raise UserError(f"{path}: metadata key {label} appears twice")
        meta[key] = value
    infos = {}
    for i in range(n_tensors):
        name = r.string(f"tensor #{i}'s name")
        label = shown(name)
        n_dims = r.scalar("<I", label)
        if not 1 <= n_dims <= MAX_DIMS:
            raise UserError(f"{path}: {label} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [r.scalar("<Q", label) for _ in range(n_dims)]
        type_id, offset = r.scalar("<I", label), r.scalar("<Q", label)
        if 0 in dims:
            raise UserError(f"{path}: {label} has a dimension of 0")
        if name in infos:
            raise UserError(f"{path}: tensor {label} appears twice")
        infos[name] = (dims, type_id, offset)
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not is_int(alignment) or alignment < 1 or alignment & (alignment - 1):
        raise UserError(f"{path}: general.alignment must be a power of two, got {brief(alignment)}")
    data_start = -(-r.pos // alignment) * alignment
    if data_start > len(data):
        raise UserError(f"{path}: the tensor data starts past the end of the file (truncated?)")
    return meta, infos, data_start


def tensor_entries(infos, data_start, file_size, path):
    """{GGUF name: Entry}: each tensor's type readable and its bytes inside the file."""
    entries = {}
    for name, (dims, type_id, offset) in infos.items():
        type_name, block, type_size = tensor_type(type_id, name, path)
        if dims[0] % block:
            raise UserError(f"{path}: {shown(name)}: rows of {dims[0]} values are not whole {type_name} blocks "
                            f"of {block}")
        nbytes = math.prod(dims[1:]) * (dims[0] // block) * type_size
        start = data_start + offset
        if start + nbytes > file_size:
            raise UserError(f"{path}: {shown(name)}: its data runs past the end of the file (truncated?)")
        entries[name] = Entry(name, type_name, block, type_size, tuple(reversed(dims)), start, nbytes)
    check_disjoint(entries, path)
    return entries


def check_disjoint(entries, path):
    """No two tensors share bytes: one range read as two weights is a forged file."""
    spans = sorted((entry.start, entry.start + entry.nbytes, name) for name, entry in entries.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise UserError(f"{path}: {shown(second)} overlaps the bytes of {shown(first)}")


def tensor_type(type_id, tensor_name, path):
    """(name, values per block, bytes per block) of a ggml type this reader turns into weights."""
    if type_id in NATIVE_TYPES:
        return NATIVE_TYPES[type_id]
    gguf = gguf_package(path, f"{shown(tensor_name)} has ggml type {type_id}, which")
    try:
        name = gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        raise UserError(f"{path}: tensor type {type_id} ({shown(tensor_name)}) is not supported")
    if not dequantizable(type_id):
        raise UserError(f"{path}: tensor type {name} ({shown(tensor_name)}) is not supported")
    return (name, *gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)])


def gguf_package(path, what="its quantized tensors"):
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path}: {what} needs the gguf package to be read (pip install gguf)")
    return gguf


@lru_cache(maxsize=None)
def dequantizable(type_id):
    """Whether the gguf package turns this type into floats: tried on one block of zeros."""
    import gguf

    kind = gguf.GGMLQuantizationType(type_id)
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[kind][1]), np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def shown(name, limit=80):
    """A name from the file as a message shows it: one line, not too long."""
    if name.isprintable() and len(name) <= limit:
        return name
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


def brief(value, limit=80):
    """A value from the file as a message shows it: its repr, one line, not too long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)
