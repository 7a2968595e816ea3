"""GGUF files (llama.cpp, Ollama, LM Studio): the metadata, the tokenizer and the weights in one file.

Layout, little-endian: "GGUF", the version (2 or 3), the tensor and metadata counts (uint64),
the metadata key/values, one info per tensor (name, dims fastest axis first, ggml type, offset),
then, aligned, the tensors' data. Files come from strangers: the header is read by a parser of
our own that bounds every count and length by the bytes left before it allocates or loops, and
every tensor's bytes must lie inside the file. The file stays memory-mapped; a tensor is read
when asked for.

Weights: F32, F16 and BF16 as stored; Q8_0, Q4_0 and Q4_1 are exactly MLX's affine quantization
in groups of 32 (quantized() lays their blocks out as MLX does); the other types the gguf package
can dequantize (K-quants, Q5_x, IQ) come as float32. GGUF llama files already hold the queries'
and keys' rows in Meta's interleaved RoPE order (llama.cpp's converter permutes Hugging Face's),
so every tensor maps to one of ours by name and nothing is permuted.

Writing (tensor_types, write): any checkpoint of this toolkit as a llama GGUF file, the reader's
mapping inverted. MLX's 4- and 8-bit quantization in groups of 32 with scales float16 holds goes
into Q4_1 and Q8_0 blocks exactly (so a GGUF file converted and written back keeps its bytes);
every other quantized tensor is quantized from float32 by the gguf package. The tokenizer is
rewritten as llama.cpp reads one: tokenizer.json's byte-level BPE (its pre-tokenizer named),
SentencePiece's pieces, or Llama 3's tiktoken ranks as byte-level BPE. Tensors are converted and
written a few rows at a time, so memory stays around one tensor whatever the model size.
"""

import collections
import contextlib
import json
import math
import mmap
import os
import re
import struct
import tempfile
from collections import namedtuple
from functools import lru_cache

import numpy as np

from tokenizer import LLAMA3_PATTERN
from utils import UserError, atomic_write, read_json

import mlx.core as mx

from formats import all_finite_bits, expected_shapes

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
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MLX_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # exactly MLX's affine quantization, groups of 32
BIAS_OFFSETS = {"Q4_0": 8, "Q8_0": 128}      # their values are d (q - offset): bias -offset d
GROUP_SIZE, F16_MAX = 32, 65504.0

GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
BLOCK_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,5})\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency RoPE divisors: read into the config
LLAMA3_ROPE = (1.0, 4.0, 8192)    # Llama 3.1-3.3's low_freq_factor, high_freq_factor, original context

# Byte-level BPE: how llama.cpp splits text before the merges (src/llama-vocab.cpp), by
# tokenizer.ggml.pre; its regexes run one after another, each on the pieces of the last.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
PRE_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    **dict.fromkeys(LLAMA3_PRES + ("dbrx", "smaug-bpe"), (LLAMA3_SPLIT,)),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), (GPT2_SPLIT,)),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    (r"\p{N}", GPT2_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2"), (QWEN2_SPLIT,)),
}
# GGUF token types, the same numbers as SentencePiece's piece types.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

Entry = namedtuple("Entry", "gguf_name type block type_size shape start nbytes")


def detect(path):
    """Whether `path` is a GGUF file: its first four bytes say so, whatever its name."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class Checkpoint:
    """An opened, fully checked GGUF llama file (see formats/__init__.py for the interface); also
    quantized_scales_dtype(name), the dtype quantized() gives the scales, for convert.py's plan."""

    def __init__(self, path):
        self.path = path
        self._map = map_file(path)
        meta, infos, data_start = read_header(self._map, path)
        check_architecture(meta, path)
        entries = tensor_entries(infos, data_start, len(self._map), path)
        rope_freqs = entries.pop(ROPE_FREQS, None)
        if rope_freqs is not None:
            rope_freqs = self._floats(rope_freqs)
        self._entries = {}
        for gguf_name, entry in entries.items():
            name = meta_name(gguf_name)
            if name is None:
                raise UserError(f"{path}: unexpected tensor {shown(gguf_name)} (not a llama weight)")
            self._entries[name] = entry
        self.config = derive_config(meta, self._entries, path, rope_freqs)
        self.shapes = expected_shapes(self.config)
        check_tensors(self._entries, self.shapes, path)
        self._tokenizer_files = tokenizer_files(meta, path)

    def stored_dtype(self, name):
        return FLOAT_DTYPES.get(self._entries[name].type)

    def quantization(self, name):
        entry = self._entries[name]
        bits = MLX_BITS.get(entry.type)
        return (GROUP_SIZE, bits) if bits and len(entry.shape) == 2 else None

    def quantized(self, name):
        """(weight uint32 [out, in * bits / 32], scales [out, in / 32], biases [out, in / 32]):
        float16 scales and biases, or float32 where a bias (-8 d, -128 d) overflows float16."""
        entry = self._entries[name]
        assert self.quantization(name), f"{name} is not stored in MLX's affine quantization"
        rows, cols = entry.shape
        blocks_RGB = self._raw(entry).reshape(rows, cols // GROUP_SIZE, entry.type_size)
        return tuple(mx.array(a) for a in mlx_affine(blocks_RGB, entry.type))

    def quantized_scales_dtype(self, name):
        """The dtype of quantized(name)'s scales and biases, read off the blocks' scales alone."""
        entry = self._entries[name]
        d = block_scales(self._raw(entry).reshape(-1, entry.type_size))
        return mx.float32 if wide_scales(d, entry.type) else mx.float16

    def tensor(self, name):
        entry = self._entries[name]
        raw = self._raw(entry)
        if entry.type == "BF16":
            return mx.array(raw.view(np.uint16).reshape(entry.shape)).view(mx.bfloat16)
        if entry.type in FLOAT_DTYPES:
            return mx.array(raw.view(FLOAT_DTYPES[entry.type]).reshape(entry.shape))
        if self.quantization(name):
            # d q + b in float32 is exactly GGUF's d (q - 8), d (q - 128), d q + m
            w, scales, biases = self.quantized(name)
            return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                 group_size=GROUP_SIZE, bits=MLX_BITS[entry.type])
        return mx.array(self._floats(entry))

    def write_tokenizer(self, folder):
        for file_name, content in self._tokenizer_files.items():
            with atomic_write(os.path.join(folder, file_name), "wb") as f:
                f.write(content)

    def _raw(self, entry):
        """The tensor's bytes, a view of the mapped file (read when used)."""
        return np.frombuffer(self._map, np.uint8, entry.nbytes, entry.start)

    @np.errstate(all="ignore")  # a stranger's NaN or infinity: no warnings printed
    def _floats(self, entry):
        """Any tensor as a float32 numpy array of its shape."""
        raw = self._raw(entry)
        if entry.type == "BF16":  # bfloat16 is float32's top half
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        if entry.type in FLOAT_DTYPES:
            return raw.view(FLOAT_DTYPES[entry.type]).astype(np.float32).reshape(entry.shape)
        rows = raw.reshape(-1, entry.shape[-1] // entry.block * entry.type_size)
        gguf = gguf_package(self.path)
        return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[entry.type]).reshape(entry.shape)


# ----------------------------------------------------------------------------- the header

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
    return entries


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


# ----------------------------------------------------------------------------- weights

def meta_name(gguf_name):
    """This toolkit's name for a GGUF llama tensor, or None."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = BLOCK_NAME.fullmatch(gguf_name)
    if match and match[2] in BLOCK_NAMES:
        return f"layers.{match[1]}.{BLOCK_NAMES[match[2]]}.weight"
    return None


def check_tensors(entries, shapes, path):
    """The file holds exactly the weights the config needs, each of its shape."""
    for name, shape in shapes.items():
        if name not in entries:
            raise UserError(f"{path}: tensor {gguf_name_of(name)} ({name}) is missing")
        if entries[name].shape != shape:
            raise UserError(f"{path}: {entries[name].gguf_name} ({name}) has shape {entries[name].shape}, "
                            f"expected {shape}")
    for name in sorted(entries.keys() - shapes.keys()):
        raise UserError(f"{path}: unexpected tensor {entries[name].gguf_name} for a model of "
                        f"{len(shapes)} weights (block_count, tied output?)")


def gguf_name_of(name):
    """The GGUF name of one of our weights (for messages)."""
    for gguf_name, ours in GLOBAL_NAMES.items():
        if ours == name:
            return gguf_name
    _, layer, *module, _ = name.split(".")
    block = {v: k for k, v in BLOCK_NAMES.items()}[".".join(module)]
    return f"blk.{layer}.{block}.weight"


@np.errstate(all="ignore")  # a stranger's NaN or infinity: no warnings printed
def mlx_affine(blocks_RGB, type_name):
    """GGUF blocks of 32 values as MLX's affine quantization: (weight uint32 [R, G*32*bits/32],
    scales [R, G], biases [R, G]), so that d q + b is each value."""
    d_RG = block_scales(blocks_RGB)
    if type_name == "Q4_1":
        m_RG = np.ascontiguousarray(blocks_RGB[..., 2:4]).view(np.float16)[..., 0]
        return mlx_nibbles(blocks_RGB[..., 4:]), d_RG, m_RG
    if type_name == "Q4_0":
        q = mlx_nibbles(blocks_RGB[..., 2:])
    else:  # Q8_0: int8 q; q + 128 as unsigned is its bits with the top one flipped
        q = (blocks_RGB[..., 2:] ^ np.uint8(0x80)).reshape(len(blocks_RGB), -1).view(np.uint32)
    bias_RG = -BIAS_OFFSETS[type_name] * d_RG.astype(np.float32)  # exact: the offset is a power of two
    if wide_scales(d_RG, type_name):
        return q, d_RG.astype(np.float32), bias_RG
    return q, d_RG, bias_RG.astype(np.float16)


def block_scales(blocks):
    """Each block's scale d, the float16 its first two bytes hold."""
    return np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]


@np.errstate(all="ignore")
def wide_scales(d, type_name):
    """Whether a bias -offset d overflows float16 (d past 65504 / offset): then the tensor's
    scales and biases are float32, where d q - offset d is still exact."""
    offset = BIAS_OFFSETS.get(type_name)
    return offset is not None and bool(np.any(np.isfinite(d) & (np.abs(d.astype(np.float32)) * offset > F16_MAX)))


def mlx_nibbles(qs_RG16):
    """4-bit values in MLX's order, as uint32 words [R, G*4]. A GGUF block keeps value j in byte
    j's low nibble and value j+16 in its high one; MLX keeps values 2b and 2b+1 in byte b."""
    values_RG32 = np.concatenate([qs_RG16 & 0x0F, qs_RG16 >> 4], axis=-1)
    packed_RG16 = values_RG32[..., 0::2] | (values_RG32[..., 1::2] << 4)
    return packed_RG16.reshape(len(qs_RG16), -1).view(np.uint32)


# ----------------------------------------------------------------------------- config

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


def check_architecture(meta, path):
    arch = meta.get("general.architecture")
    if arch is None:
        raise UserError(f"{path}: no general.architecture in its metadata")
    if arch != "llama":
        raise UserError(f"{path}: architecture {brief(arch)} is not supported (supported: llama)")
    experts = meta.get("llama.expert_count", 0)
    if experts:
        raise UserError(f"{path}: llama.expert_count {brief(experts)}: mixture-of-experts models are not supported")


def positive_int(meta, key, path, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{path}: metadata key {key} is missing")
    if not is_int(value) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, got {brief(value)}")
    return value


def positive_number(meta, key, path, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{path}: metadata key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{path}: {key} must be a positive finite number, got {brief(value)}")
    return float(value)


def derive_config(meta, entries, path, rope_freqs):
    """convert.py's config keys and the tokenizer's, from the llama.* and tokenizer.ggml.* keys."""
    n_layers = positive_int(meta, "llama.block_count", path)
    if n_layers > len(entries):  # bounds the weights expected_shapes will list
        raise UserError(f"{path}: llama.block_count {n_layers} but the file holds only {len(entries)} tensors")
    dim = positive_int(meta, "llama.embedding_length", path)
    n_heads = positive_int(meta, "llama.attention.head_count", path)
    n_kv_heads = positive_int(meta, "llama.attention.head_count_kv", path, n_heads)
    if n_heads % n_kv_heads:
        raise UserError(f"{path}: llama.attention.head_count {n_heads} is not a multiple of "
                        f"llama.attention.head_count_kv {n_kv_heads}")
    if "llama.attention.key_length" not in meta and dim % n_heads:
        raise UserError(f"{path}: llama.embedding_length {dim} is not divisible by llama.attention.head_count "
                        f"{n_heads} (and no llama.attention.key_length)")
    head_dim = positive_int(meta, "llama.attention.key_length", path, dim // n_heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if positive_int(meta, key, path, head_dim) != head_dim:
            raise UserError(f"{path}: {key} {meta[key]} differs from the head size {head_dim} "
                            "(partial rotary and other value sizes are not supported)")
    rope_theta = positive_number(meta, "llama.rope.freq_base", path, 10000.0)
    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "head_dim": head_dim, "hidden_dim": positive_int(meta, "llama.feed_forward_length", path),
              "norm_eps": positive_number(meta, "llama.attention.layer_norm_rms_epsilon", path),
              "vocab_size": vocab_size(meta, entries, path), "rope_theta": rope_theta, "sliding_window": None,
              "tie_word_embeddings": "output.weight" not in entries}
    if "llama.context_length" in meta:
        config["context_length"] = positive_int(meta, "llama.context_length", path)
    scaling = rope_scaling(meta, path, rope_freqs, rope_theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(special_tokens(meta, config["vocab_size"], path))
    return config


def vocab_size(meta, entries, path):
    """llama.vocab_size, else the token list's length: the embedding's rows (checked with the shapes)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens must be a list of token strings, got "
                        f"{type(tokens).__name__ if tokens is not None else 'nothing'}")
    size = positive_int(meta, "llama.vocab_size", path, len(tokens))
    if size != len(tokens):
        raise UserError(f"{path}: llama.vocab_size {size} but tokenizer.ggml.tokens holds {len(tokens)} tokens")
    return size


def rope_scaling(meta, path, rope_freqs, theta, head_dim):
    """The config's rope_scaling: linear from llama.rope.scaling.*, llama3 recovered from rope_freqs."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind != "none":
            raise UserError(f"{path}: both llama.rope.scaling.type {brief(kind)} and {ROPE_FREQS}: not supported")
        if rope_freqs.shape != (head_dim // 2,):
            raise UserError(f"{path}: {ROPE_FREQS} has shape {rope_freqs.shape}, expected ({head_dim // 2},)")
        return llama3_rope_scaling(rope_freqs.astype(np.float64), theta, head_dim, path)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": positive_number(meta, "llama.rope.scaling.factor", path)}
    raise UserError(f"{path}: RoPE scaling {brief(kind)} is not supported (supported: linear, and Llama 3's "
                    f"{ROPE_FREQS})")


def llama3_rope_factors(wavelength, factor, low, high, old):
    """Each RoPE frequency's divisor under Llama 3.1's scaling (llama.cpp's rope_freqs)."""
    smooth = (old / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, factor, blended))


@np.errstate(all="ignore")  # a stranger's NaN or infinity: no warnings printed
def llama3_rope_scaling(factors, theta, head_dim, path):
    """Llama 3.1's scaling parameters that give the file's rope_freqs.

    The divisors are factor for long wavelengths, 1 for short ones and a blend between, linear in
    old / wavelength; any (low, high, old) with the same blend gives the same model. Llama 3's own
    values are tried first, then those the first and last blended divisors give."""
    refusal = UserError(f"{path}: {ROPE_FREQS} does not follow Llama 3's RoPE scaling (factor, low/high "
                        "frequency factors, original context); other per-frequency scalings are not supported")
    if not np.all(np.isfinite(factors) & (factors >= 1.0)):
        raise refusal
    if np.all(factors == 1.0):
        return None
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(str(np.float32(factors.max())))
    candidates = [LLAMA3_ROPE]
    middle = np.flatnonzero((factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6)))
    if len(middle) >= 2:
        x = 1 / wavelength[middle[[0, -1]]]
        smooth = (1 / factors[middle[[0, -1]]] - 1 / factor) / (1 - 1 / factor)  # = a x + b
        a = (smooth[1] - smooth[0]) / (x[1] - x[0])
        b = smooth[0] - a * x[0]
        if b < 0 < a and np.isfinite(a / b):  # low = 1: high = 1 - 1 / b, old = -a / b
            candidates.append((1.0, float(f"{1 - 1 / b:.6g}"), round(-a / b)))
    if len(middle) == 1:  # one blended divisor: low 1, a whole context near Llama's high 4, the high that fits
        wave, smooth = wavelength[middle[0]], (1 / factors[middle[0]] - 1 / factor) / (1 - 1 / factor)
        old = round(wave * (1 + (LLAMA3_ROPE[1] - 1) * smooth))
        candidates.append((1.0, float(f"{1 + (old / wave - 1) / smooth:.6g}"), old))
    for low, high, old in candidates:
        if np.allclose(llama3_rope_factors(wavelength, factor, low, high, old), factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    raise refusal


def special_tokens(meta, n_tokens, path):
    """bos_token_id, eos_token_ids (the end of text, then end of turn and of message), add_bos_token."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not (is_int(value) and 0 <= value < n_tokens):
            raise UserError(f"{path}: tokenizer.ggml.{key} must be a token id below {n_tokens}, got {brief(value)}")
        ids[key] = value
    ends = [ids[key] for key in ("eos_token_id", "eot_token_id", "eom_token_id") if ids[key] is not None]
    ends = sorted(set(ends), key=ends.index)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    # llama.cpp's convention when the file does not say: SentencePiece and Llama 3 vocabularies add BOS
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in LLAMA3_PRES)
    if not isinstance(add_bos, bool):
        raise UserError(f"{path}: tokenizer.ggml.add_bos_token must be true or false, got {brief(add_bos)}")
    return {"bos_token_id": ids["bos_token_id"], "eos_token_ids": ends, "add_bos_token": add_bos}


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_files(meta, path):
    """{file name: bytes} of the tokenizer the file describes, built and checked now."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]  # checked by vocab_size
    types = token_types(meta, len(tokens), path)
    for i, token in enumerate(tokens):
        if not token:
            raise UserError(f"{path}: tokenizer.ggml.tokens[{i}] is empty")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens holds a token twice")
    if model == "gpt2":
        files = {"tokenizer.json": byte_level_bpe(meta, tokens, types, path)}
    elif model == "llama":
        files = {"tokenizer.model": sentencepiece_model(meta, tokens, types, path)}
    else:
        raise UserError(f"{path}: tokenizer model {brief(model)} is not supported (supported: gpt2, llama)")
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise UserError(f"{path}: tokenizer.chat_template must be text, got {brief(template)}")
        files["chat_template.jinja"] = template.encode("utf-8")
    return files


def token_types(meta, n_tokens, path):
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return np.full(n_tokens, NORMAL)
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != n_tokens:
        raise UserError(f"{path}: tokenizer.ggml.token_type must be {n_tokens} integers, one a token")
    if np.any((types < UNDEFINED) | (types > BYTE)):
        raise UserError(f"{path}: tokenizer.ggml.token_type holds a type outside 0 to {BYTE}")
    return np.where(types == UNDEFINED, NORMAL, types)


def byte_level_bpe(meta, tokens, types, path):
    """tokenizer.json of a byte-level BPE vocabulary (GPT-2's alphabet, as GGUF stores it), split
    as llama.cpp splits for tokenizer.ggml.pre; control tokens special, user-defined ones added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the file names none
    if pre not in PRE_SPLITS:
        raise UserError(f"{path}: tokenizer.ggml.pre {brief(pre)} is not supported (supported: "
                        f"{', '.join(sorted(PRE_SPLITS))})")
    ids = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=ids, merges=merge_pairs(meta, ids, path), ignore_merges=pre in LLAMA3_PRES)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tokenizer.to_str().encode("utf-8")


def merge_pairs(meta, ids, path):
    """tokenizer.ggml.merges as (left, right) pairs, split at the first space after the first
    character (llama.cpp's rule); both halves and their join must be tokens."""
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise UserError(f"{path}: a gpt2 vocabulary needs tokenizer.ggml.merges, a list of strings")
    pairs = []
    for i, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = merge[:max(cut, 0)], merge[cut + 1:]
        if cut < 0 or left not in ids or right not in ids or left + right not in ids:
            raise UserError(f"{path}: tokenizer.ggml.merges[{i}] {brief(merge)} is not two tokens that "
                            "merge into a token")
        pairs.append((left, right))
    return pairs


def sentencepiece_model(meta, tokens, types, path):
    """tokenizer.model of a SentencePiece (llama) vocabulary: a BPE ModelProto with the pieces,
    scores and types, and LLaMA's normalizer; loaded once here to check it."""
    import sentencepiece as spm

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.dtype.kind != "f" or len(scores) != len(tokens):
        raise UserError(f"{path}: a llama vocabulary needs tokenizer.ggml.scores, {len(tokens)} numbers")
    if not np.all(np.isfinite(scores)):
        raise UserError(f"{path}: tokenizer.ggml.scores holds NaN or infinity")
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    if not np.any(types == UNKNOWN) and is_int(unknown) and 0 <= unknown < len(tokens):
        types = np.where(np.arange(len(tokens)) == unknown, UNKNOWN, types)
    pieces = b"".join(proto_field(1, proto_field(1, t) + proto_field(2, float(s)) + proto_field(3, int(k)))
                      for t, s, k in zip(tokens, scores, types))
    trainer = proto_field(3, 2) + proto_field(4, len(tokens))  # model_type BPE, vocab_size
    trainer += proto_field(26, True)  # runs of spaces stay whole, as llama.cpp merges them
    trainer += proto_field(35, bool(np.any(types == BYTE)))  # byte_fallback: <0xNN> pieces for the rest
    specials = {"unknown_token_id": (40, 45), "bos_token_id": (41, 46), "eos_token_id": (42, 47),
                "padding_token_id": (43, 48)}
    for key, (id_field, piece_field) in specials.items():
        token = meta.get(f"tokenizer.ggml.{key}")
        if is_int(token) and 0 <= token < len(tokens):
            trainer += proto_field(id_field, token) + proto_field(piece_field, tokens[token])
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(add_prefix, bool):
        raise UserError(f"{path}: tokenizer.ggml.add_space_prefix must be true or false, got {brief(add_prefix)}")
    # LLaMA's normalizer: no NFKC, a space before the text, spaces as U+2581, runs of them kept
    normalizer = (proto_field(1, "identity") + proto_field(3, add_prefix) + proto_field(4, False)
                  + proto_field(5, True))
    model = pieces + proto_field(2, trainer) + proto_field(3, normalizer)
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(model)
    except RuntimeError as e:  # sentencepiece's report of a bad model
        detail = shown(str(e).strip() or type(e).__name__, 200)
        raise UserError(f"{path}: its llama vocabulary is not a valid SentencePiece model ({detail})")
    return model


def proto_field(number, value):
    """One protobuf field: bools and ints as varints, floats as fixed32, text length-delimited."""
    if isinstance(value, float):
        return proto_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return proto_varint(number << 3) + proto_varint(int(value))
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return proto_varint(number << 3 | 2) + proto_varint(len(raw)) + raw


def proto_varint(n):
    n &= (1 << 64) - 1  # a negative int32 is ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# ----------------------------------------------------------------------------- writing

# The ggml types written, and what chooses them: a float dtype, or a bit width (quantizable rows).
WRITTEN_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
DTYPE_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
BITS_TYPES = {4: "Q4_1", 8: "Q8_0"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}  # general.file_type
# A config without context_length came from Meta's params.json, which does not say: Llama 2's and
# Mistral's 4096 gives llama.cpp a default context that every such model handles.
DEFAULT_CONTEXT = 4096
CHUNK_VALUES = 1 << 22  # rows converted at a time: about 16 MiB of float32, whatever the tensor
# Pre-tokenizers by the regexes they split by: the reader's names first, then Hugging Face's spellings.
PRE_NAMES = {PRE_SPLITS[name]: name for name in ("default", "llama-bpe", "gpt-2", "smollm", "qwen2")}
PRE_NAMES[(LLAMA3_PATTERN,)] = "llama-bpe"  # Llama 3's tokenizer.json: (?i:'s|...) for the contractions
PAD_SCORE = -1000.0  # llama.cpp's score for the [PADn] tokens that fill a vocabulary up to the model's rows
EOM_TOKEN = "<|eom_id|>"   # Llama 3.1's end of a message that awaits a tool's answer
SPM_BPE = 2          # SentencePiece's TrainerSpec.model_type for BPE (1, the default, is unigram)

Vocabulary = namedtuple("Vocabulary", "model pre tokens types merges scores add_space_prefix")


def tensor_types(checkpoint, dtype=None, bits=None):
    """{name: ggml type name} each weight is written in: norms in F32 always; 2-D weights in `dtype`
    ("float32", "float16", "bfloat16"), or quantized to `bits` (4: Q4_1, 8: Q8_0; rows that are not
    whole blocks of 32 in `dtype`, else F16), or by default as the checkpoint holds them: MLX's 2-
    to 4-bit quantization as Q4_1, 6- and 8-bit as Q8_0 (the nearest type at least as precise),
    floats in their stored type, and other quantizations (K-quants) in F16."""
    if dtype is not None and dtype not in DTYPE_TYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_TYPES)}, got {dtype!r}")
    if bits is not None and bits not in BITS_TYPES:
        raise UserError(f"GGUF quantization bits must be 4 (Q4_1) or 8 (Q8_0), got {bits!r}")
    return {name: chosen_type(checkpoint, name, shape, dtype, bits) for name, shape in checkpoint.shapes.items()}


def chosen_type(checkpoint, name, shape, dtype, bits):
    if len(shape) == 1:
        return "F32"  # llama.cpp keeps the norms in float32
    if bits is not None:
        return BITS_TYPES[bits] if shape[-1] % GROUP_SIZE == 0 else DTYPE_TYPES[dtype or "float16"]
    if dtype is not None:
        return DTYPE_TYPES[dtype]
    q = checkpoint.quantization(name)
    if q is not None:
        return "Q4_1" if q[1] <= 4 else "Q8_0"
    return DTYPE_TYPES.get(checkpoint.stored_dtype(name), "F16")


def write(checkpoint, path, types):
    """Write `checkpoint` as a llama GGUF file at `path`, each weight in types[name] (tensor_types).

    Everything is checked and the tokenizer built before the file is opened; then the header, and
    the tensors one at a time, a few rows at a time. A failure removes the file; an OSError (a full
    disk) is left for the caller's atomic write to report."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path}: writing a GGUF file needs the gguf package (pip install gguf)")
    check_exportable(checkpoint, types)
    vocab = exported_vocabulary(checkpoint)
    rope_freqs = exported_rope_freqs(checkpoint.config)
    writer = gguf.GGUFWriter(path, "llama")
    add_model_metadata(writer, checkpoint, types)
    add_vocabulary(writer, vocab)
    infos = ([(ROPE_FREQS, rope_freqs.shape, "F32")] if rope_freqs is not None else []) + \
        [(gguf_name_of(name), shape, types[name]) for name, shape in checkpoint.shapes.items()]
    for gguf_name, shape, type_name in infos:
        qtype = gguf.GGMLQuantizationType[type_name]
        rows, cols = math.prod(shape[:-1]), shape[-1]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(gguf_name, (*shape[:-1], cols // block * type_size), np.uint8,
                               rows * (cols // block) * type_size, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # Tensor data written straight to the writer's file: its write_tensor_data takes a whole tensor
        f = writer.fout[0]
        if rope_freqs is not None:
            write_tensor(writer, f, [rope_freqs.view(np.uint8)])
        for name in checkpoint.shapes:
            write_tensor(writer, f, tensor_chunks(checkpoint, name, types[name]))
        writer.close()
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def write_tensor(writer, f, chunks):
    """One tensor's bytes, starting at the file's alignment, padded as llama.cpp's writer pads."""
    writer.write_padding(f, f.tell())
    nbytes = 0
    for chunk in chunks:
        f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        nbytes += chunk.nbytes
    writer.write_padding(f, nbytes)


def check_exportable(checkpoint, types):
    """What llama.cpp's llama architecture cannot hold is refused before anything is written."""
    config = checkpoint.config
    if config.get("sliding_window") is not None:
        raise UserError(f"{checkpoint.path}: a sliding window of {config['sliding_window']} tokens (Mistral): "
                        "llama.cpp's llama architecture has none, so its GGUF would compute another model")
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type") not in ("linear", "llama3"):
        raise UserError(f"{checkpoint.path}: RoPE scaling {scaling.get('rope_type')!r} cannot be written to GGUF "
                        "(supported: linear, llama3)")
    assert types.keys() == checkpoint.shapes.keys(), "a type for every weight"
    for name, shape in checkpoint.shapes.items():
        assert types[name] in WRITTEN_TYPES, (name, types[name])
        assert len(shape) == 2 or types[name] == "F32", f"{name}: llama.cpp keeps norms in F32"
        assert types[name] in FLOAT_DTYPES or shape[-1] % GROUP_SIZE == 0, f"{name}: rows not whole blocks"


def add_model_metadata(writer, checkpoint, types):
    import gguf

    c = checkpoint.config
    matrix_types = [types[name] for name, shape in checkpoint.shapes.items() if len(shape) == 2]
    writer.add_name(model_name(checkpoint.path))
    writer.add_file_type(FILE_TYPES[collections.Counter(matrix_types).most_common(1)[0][0]])
    if any(t not in FLOAT_DTYPES for t in matrix_types):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(c["n_layers"])
    writer.add_context_length(c.get("context_length") or DEFAULT_CONTEXT)
    writer.add_embedding_length(c["dim"])
    writer.add_feed_forward_length(c["hidden_dim"])
    writer.add_head_count(c["n_heads"])
    writer.add_head_count_kv(c["n_kv_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    scaling = c.get("rope_scaling")
    if scaling is not None and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def model_name(path):
    """general.name: the model folder's name (a file's, without its extension)."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.splitext(name)[0] if os.path.isfile(path) else name


def exported_rope_freqs(config):
    """Llama 3.1's scaling as llama.cpp's converter writes it: each frequency's divisor, float32
    [head_dim / 2], in rope_freqs.weight; None for other models."""
    scaling = config.get("rope_scaling")
    if scaling is None or scaling["rope_type"] != "llama3":
        return None
    head_dim = config["head_dim"]
    wavelength = 2 * np.pi * config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    return llama3_rope_factors(wavelength, scaling["factor"], scaling["low_freq_factor"],
                               scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"]).astype(np.float32)


# ----------------------------------------------------------------------------- writing: weights

def tensor_chunks(checkpoint, name, type_name):
    """The weight's bytes in `type_name`, as uint8 arrays of a few rows each."""
    own = own_code_blocks(checkpoint, name, type_name)
    if own is not None:
        yield from own
        return
    import gguf

    for rows in weight_rows(checkpoint, name):
        if type_name in FLOAT_DTYPES:
            bits = {"F32": mx.uint32, "F16": mx.uint16, "BF16": mx.uint16}[type_name]
            out = np.asarray(rows.astype(getattr(mx, FLOAT_DTYPES[type_name])).view(bits))
        else:
            with np.errstate(all="ignore"):  # NaN or infinity is reported below, in the result
                out = gguf.quants.quantize(np.asarray(rows.astype(mx.float32)), gguf.GGMLQuantizationType[type_name])
        if not finite_values(out, type_name):
            raise UserError(f"{checkpoint.path}: {name} is not finite in {type_name}: NaN, infinity, or values "
                            "beyond that type's range" + (" (try float32 or bfloat16)" if type_name == "F16" else ""))
        yield out.view(np.uint8)


def written_values(checkpoint, name, type_name):
    """The float32 values a tensor takes in a GGUF file as `type_name` (Q8_0, Q4_1): write()'s own
    blocks, dequantized as readers dequantize them. What an export's precision costs, exactly."""
    import gguf

    blocks = np.concatenate(list(tensor_chunks(checkpoint, name, type_name)))
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name])
    return mx.array(values.reshape(checkpoint.shapes[name]))


def weight_rows(checkpoint, name):
    """The weight a few rows at a time: as stored, or float32 where it is held quantized (dequantized
    a few rows at a time, so that a quantized embedding is never whole in float32)."""
    q = checkpoint.quantization(name)
    arrays = checkpoint.quantized(name) if q is not None else (checkpoint.tensor(name),)
    mx.eval(arrays)  # read once, whole: slices of an unread array would each read it
    n_rows, n_cols = checkpoint.shapes[name][0], checkpoint.shapes[name][-1]
    step = max(1, CHUNK_VALUES // n_cols)
    for start in range(0, n_rows, step):
        part = [a[start:start + step] for a in arrays]
        if q is None:
            yield part[0]
        else:  # as every format's tensor() dequantizes: d q + b in float32
            weight, scales, biases = part
            yield mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                                group_size=q[0], bits=q[1])


def finite_values(out, type_name):
    """Whether a float tensor's bits, or a quantized one's block scales (d, and Q4_1's m), are finite."""
    if type_name in FLOAT_DTYPES:
        return all_finite_bits(out, FLOAT_DTYPES[type_name])
    blocks = out.reshape(-1, {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name])
    scales = blocks[:, :4 if type_name == "Q4_1" else 2]
    return bool(np.all(np.isfinite(np.ascontiguousarray(scales).view(np.float16))))


def own_code_blocks(checkpoint, name, type_name):
    """The weight's own codes as Q4_1 or Q8_0 blocks, chunks of rows, when it is held in MLX's
    affine quantization in groups of 32 (Q8_0: biases -128 scale, as the reader makes of Q8_0);
    else None, and it is quantized from float32. Scales float16 holds are copied exactly; others
    are rounded to float16, which moves a value far less than re-quantizing would (a step's
    2^-11 against half a step)."""
    q = {"Q4_1": (GROUP_SIZE, 4), "Q8_0": (GROUP_SIZE, 8)}.get(type_name)
    if q is None or checkpoint.quantization(name) != q:
        return None
    w, scales, biases = checkpoint.quantized(name)
    s_RG, b_RG = (np.asarray(a.astype(mx.float32)) for a in (scales, biases))
    d_RG = finite_float16(s_RG)
    if d_RG is None:
        return None
    if type_name == "Q4_1":
        m_RG = finite_float16(b_RG)
        if m_RG is None:
            return None
        heads_RGB = np.stack([d_RG, m_RG], axis=-1).view(np.uint8)  # d, m: two float16 each block
    else:
        if not np.array_equal(b_RG, -128 * s_RG):  # exact in float32: 128 is a power of two
            return None
        heads_RGB = d_RG[..., None].view(np.uint8)
    mx.eval(w)  # read once, whole: slices of an unread array would each read it
    return own_code_chunks(w, heads_RGB, type_name)


def own_code_chunks(w, heads_RGB, type_name):
    """Blocks of a few rows at a time: each block's head (d, or d and m) then its codes."""
    rows_per_chunk = max(1, CHUNK_VALUES // (heads_RGB.shape[1] * GROUP_SIZE))
    for start in range(0, w.shape[0], rows_per_chunk):
        words = np.asarray(w[start:start + rows_per_chunk])
        heads = heads_RGB[start:start + rows_per_chunk]
        n, groups = heads.shape[:2]
        if type_name == "Q4_1":
            codes_RGB = gguf_nibbles(words.view(np.uint8).reshape(n, groups, 16))
        else:  # MLX's q + 128, unsigned: Q8_0's signed q is the same bits with the top one flipped
            codes_RGB = words.view(np.uint8).reshape(n, groups, 32) ^ np.uint8(0x80)
        yield np.concatenate([heads, codes_RGB], axis=-1).reshape(n, -1)


def finite_float16(a):
    """`a` rounded to float16, or None where a value is beyond float16's range."""
    with np.errstate(over="ignore"):
        half = a.astype(np.float16)
    return half if np.all(np.isfinite(half)) else None


def gguf_nibbles(packed_RG16):
    """MLX's 4-bit values (values 2b and 2b+1 in byte b of a group) in GGUF's block order (value j
    in byte j's low nibble, value j+16 in its high one): mlx_nibbles undone."""
    values_RG32 = np.empty(packed_RG16.shape[:-1] + (32,), np.uint8)
    values_RG32[..., 0::2], values_RG32[..., 1::2] = packed_RG16 & 0x0F, packed_RG16 >> 4
    return values_RG32[..., :16] | (values_RG32[..., 16:] << 4)


# ----------------------------------------------------------------------------- writing: tokenizer

def exported_vocabulary(checkpoint):
    """(Vocabulary, special tokens, chat template or None) of the checkpoint's tokenizer: its files as
    the checkpoint writes them into a model folder, its special tokens as this toolkit reads them."""
    import chat
    from tokenizer import is_tiktoken_file, load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write_tokenizer(folder)  # every format's tokenizer files, as a model folder holds them
        config = checkpoint.config
        n_vocab = config["vocab_size"]
        json_path, model_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
        data = read_json(json_path, "tokenizer") if os.path.isfile(json_path) else None
        if data is not None and is_byte_level(data):
            vocab = byte_level_vocabulary(data, n_vocab, checkpoint.path)
        elif os.path.isfile(model_path) and is_tiktoken_file(model_path):
            vocab = tiktoken_vocabulary(model_path, n_vocab, checkpoint.path)
        elif os.path.isfile(model_path):
            vocab = sentencepiece_vocabulary(model_path, n_vocab, checkpoint.path)
        elif data is not None:
            raise UserError(f"{checkpoint.path}: its tokenizer.json is not a byte-level BPE, and there is no "
                            "tokenizer.model: llama.cpp holds neither")
        else:
            raise UserError(f"{checkpoint.path}: no tokenizer (tokenizer.json or tokenizer.model) to write into "
                            "the GGUF file")
        settings = {key: config[key] for key in ("bos_token_id", "eos_token_ids", "add_bos_token") if key in config}
        # this toolkit's tokenizer of the folder: the special tokens exactly as it encodes with them
        ours = load_tokenizer(folder, settings)
        ends = list(settings.get("eos_token_ids") or ([ours.eos_id] if ours.eos_id is not None else []))
        ends += sorted(ours.eos_ids - set(ends))
        specials = {"bos": ours.bos_id, "ends": ends, "add_bos": bool(ours.add_bos)}
        return vocab, specials, chat.load_template(folder)


def add_vocabulary(writer, exported):
    """tokenizer.ggml.*: the vocabulary, BOS, the end tokens (end of text, of turn, of message),
    whether BOS is added, and the chat template."""
    vocab, specials, template = exported
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        if UNKNOWN in vocab.types:
            writer.add_unk_token_id(vocab.types.index(UNKNOWN))
    if specials["bos"] is not None:
        writer.add_bos_token_id(specials["bos"])
    if specials["ends"]:
        writer.add_eos_token_id(specials["ends"][0])
    # llama.cpp has one more end of a turn (eot) and of a message (eom, Llama 3.1's tool calls)
    rest = specials["ends"][1:]
    eom = next((token for token in rest if vocab.tokens[token] == EOM_TOKEN), None)
    eot = next((token for token in rest if token != eom), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if eom is not None:
        writer.add_eom_token_id(eom)
    writer.add_add_bos_token(specials["add_bos"])
    if template is not None:
        writer.add_chat_template(template)


def padded(tokens, types, n_vocab, where):
    """The vocabulary filled up to the model's rows with [PADn] tokens (unused), as llama.cpp's
    converter fills it; ids past the model's rows are refused."""
    if len(tokens) > n_vocab:
        raise UserError(f"{where}: the tokenizer has {len(tokens)} tokens, the model only {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(None)
        types.append(UNUSED)
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{where}: the tokenizer holds a token twice")
    return tokens, types


def is_byte_level(data):
    """Whether a tokenizer.json is a byte-level BPE: a BPE model with a ByteLevel pre-tokenizer or decoder."""
    def kinds(part):
        if not isinstance(part, dict):
            return []
        inner = part.get("pretokenizers") or part.get("decoders") or []
        return [part.get("type")] + [k for p in inner for k in kinds(p)]

    model = data.get("model") if isinstance(data, dict) else None
    return (isinstance(model, dict) and model.get("type") == "BPE"
            and "ByteLevel" in kinds(data.get("pre_tokenizer")) + kinds(data.get("decoder")))


def pre_tokenizer_name(pre, ignore_merges):
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer: Splits (or Digits) then a
    ByteLevel, named by the regexes they split by; None when it is anything else."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not steps or not all(isinstance(step, dict) for step in steps):
        return None
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    regexes = []
    for step in splits:
        pattern = step.get("pattern")
        if step.get("type") == "Digits" and step.get("individual_digits"):
            regexes.append(r"\p{N}")
        elif (step.get("type") == "Split" and isinstance(pattern, dict) and "Regex" in pattern
              and step.get("behavior") == "Isolated" and not step.get("invert")):
            regexes.append(pattern["Regex"])
        else:
            return None
    if last.get("use_regex", True):  # ByteLevel's own split is GPT-2's
        regexes.append(GPT2_SPLIT)
    name = PRE_NAMES.get(tuple(regexes))
    # llama-bpe looks a whole piece up before merging (BPE's ignore_merges); smaug-bpe, split the same, merges
    return "smaug-bpe" if name == "llama-bpe" and not ignore_merges else name


def byte_level_vocabulary(data, n_vocab, where):
    """gpt2: tokens in id order (the added ones at their ids: special ones control, others user-
    defined), merges as "a b", and the pre-tokenizer's name."""
    model = data["model"]
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), model.get("ignore_merges", False))
    if pre is None:
        raise UserError(f"{where}: cannot name this tokenizer's pre-tokenizer for llama.cpp "
                        f"({brief(json.dumps(data.get('pre_tokenizer')), 120)})")
    if data.get("normalizer") is not None:
        raise UserError(f"{where}: its tokenizer.json has a normalizer ({brief(data['normalizer'].get('type'))}), "
                        "which llama.cpp's byte-level BPE does not apply")
    ids = dict(model.get("vocab") or {})
    ids.update({added["content"]: added["id"] for added in data.get("added_tokens", [])})
    tokens, types = [None] * (max(ids.values(), default=-1) + 1), [NORMAL] * (max(ids.values(), default=-1) + 1)
    for token, i in ids.items():
        tokens[i] = token
    for added in data.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    tokens, types = padded(tokens, types, n_vocab, where)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocabulary("gpt2", pre, tokens, types, merges, None, None)


def tiktoken_vocabulary(path, n_vocab, where):
    """Llama 3's tiktoken ranks as the byte-level BPE llama.cpp reads: each token's bytes spelled
    in GPT-2's alphabet, the merges its ranks imply, the 256 specials as control tokens."""
    from tokenizer import llama3_special_tokens, read_tiktoken_ranks

    ranks = read_tiktoken_ranks(path)
    spelling = byte_spelling()
    tokens = ["".join(spelling[b] for b in token) for token in ranks]  # in rank order: the ids
    types = [NORMAL] * len(tokens)
    for name, i in llama3_special_tokens(path, len(ranks)).items():
        tokens.append(name)
        types.append(CONTROL)
    tokens, types = padded(tokens, types, n_vocab, where)
    return Vocabulary("gpt2", "llama-bpe", tokens, types, tiktoken_merges(ranks, tokens), None, None)


def tiktoken_merges(ranks, tokens):
    """The merges a rank table implies, as Hugging Face's converter makes them: every split of a
    token into two tokens, by the rank of the token they make, then of its halves."""
    merges = []
    for token, rank in ranks.items():
        halves = [(ranks[token[:i]], ranks[token[i:]]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{tokens[left]} {tokens[right]}" for left, right in sorted(halves)]
    return merges


@lru_cache(maxsize=1)
def byte_spelling():
    """GPT-2's alphabet: each byte as a printable character (printable Latin-1 as itself, the
    others as the characters from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    spelled = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [spelled[b] for b in range(256)]


def sentencepiece_vocabulary(path, n_vocab, where):
    """llama: SentencePiece's pieces, scores and types (the same numbers as GGUF's), read off the
    model's protobuf, and add_space_prefix from its normalizer."""
    import sentencepiece as spm

    with open(path, "rb") as f:
        raw = f.read()
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(raw)  # checks the whole model once
    except RuntimeError as e:
        raise UserError(f"{where}: its tokenizer.model is not a SentencePiece model ({shown(str(e), 200)})")
    tokens, scores, types, trainer, normalizer = [], [], [], {}, {}
    for number, value in proto_fields(raw):
        if number == 1:  # a piece: its text, score and type
            piece = dict(proto_fields(value))
            tokens.append(piece.get(1, b"").decode("utf-8"))
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(piece.get(3, NORMAL))
        elif number in (2, 3):
            (trainer if number == 2 else normalizer).update(proto_fields(value))
    if trainer.get(3, 1) != SPM_BPE:
        raise UserError(f"{where}: its tokenizer.model is a SentencePiece unigram model; llama.cpp's llama "
                        "vocabulary merges pieces as BPE does")
    n_pieces = len(tokens)
    tokens, types = padded(tokens, types, n_vocab, where)
    scores += [PAD_SCORE] * (len(tokens) - n_pieces)
    return Vocabulary("llama", None, tokens, types, None, scores, bool(normalizer.get(3, True)))


def proto_fields(data):
    """(field number, value) of each field of a protobuf message: varints as ints, length-delimited
    fields as bytes, fixed-width ones as their bytes."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            n, pos = read_varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        else:
            n = {1: 8, 5: 4}[wire]
            value, pos = data[pos:pos + n], pos + n
        yield key >> 3, value


def read_varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
