"""GGUF files (llama.cpp, Ollama, LM Studio): the metadata, the tokenizer and the weights in one file.

Layout, little-endian: "GGUF", the version (2 or 3), the tensor and metadata counts (uint64),
the metadata key/values, one info per tensor (name, dims fastest axis first, ggml type, offset),
then, aligned, the tensors' data. Files come from strangers: the header is read by a parser of
our own that bounds every count and length by the bytes left before it allocates or loops, and
every tensor's bytes must lie inside the file. The file stays memory-mapped; a tensor is read
when asked for.

Weights: F32, F16 and BF16 as stored; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q5_K are exactly MLX's
affine quantization in groups of 32 (quantized() lays their blocks out as MLX does; K-quants with
float32 scales, kquants.py); a Q6_K matrix offers its own blocks (block_type, gguf_blocks: convert.py
keeps a linear's as they are, for models.BlockQuantizedLinear), and, like Q3_K and Q2_K, MLX's 8
bits in groups of 32 re-quantized from its exact values (an embedding's form; their tensor() is
exact); the other types the gguf package can dequantize (IQ) come as float32. held_as(name) says
which, in words. GGUF llama files already hold the queries'
and keys' rows in Meta's interleaved RoPE order (llama.cpp's converter permutes Hugging Face's),
so every tensor maps to one of ours by name and nothing is permuted.

Writing (writer.py: tensor_types, write): any checkpoint of this toolkit as a llama GGUF file, the reader's
mapping inverted. MLX's 4- and 8-bit quantization in groups of 32 with scales float16 holds goes
into Q4_1 and Q8_0 blocks exactly, a weight read from Q4_K or Q5_K into its own superblocks again
(so a GGUF file converted and written back keeps its bytes), a weight held in Q6_K blocks as they
are; a weight a GGUF file held in Q4_K, Q5_K or Q6_K (gguf_type(name), kept in a converted folder's
config.json) is written back in that type, quantized by our own quantizer where its superblocks are
not at hand; every other quantized tensor
is quantized from float32 by the gguf package. The tokenizer is
rewritten as llama.cpp reads one: tokenizer.json's byte-level BPE (its pre-tokenizer named),
SentencePiece's pieces, or Llama 3's tiktoken ranks as byte-level BPE. Tensors are converted and
written a few rows at a time, so memory stays around one tensor whatever the model size.

One module a concern: header.py (the bounded parser), names.py (GGUF's names and ours), blocks.py
(quantized blocks both ways), config.py (metadata to config), vocabulary.py (tokenizers both ways),
writer.py; the reader's Checkpoint is here.
"""

import os

import mlx.core as mx
import numpy as np

import ops
from formats.gguf import kquants
from formats.gguf.blocks import (
    FLOAT_DTYPES,
    GROUP_SIZE,
    HELD_BITS,
    block_scales,
    finite_values,
    kquant_affine,
    mlx_affine,
    requantized_affine,
    wide_scales,
    written_values,
)
from formats.gguf.config import check_architecture, derive_config
from formats.gguf.header import (
    MAGIC,
    gguf_package,
    map_file,
    read_header,
    shown,
    tensor_entries,
)
from formats.gguf.names import ROPE_FREQS, check_tensors, our_name
from formats.gguf.vocabulary import (
    LLAMA3_PRES,
    PRE_SPLITS,
    byte_spelling,
    tokenizer_files,
)
from formats.gguf.writer import tensor_types, write
from models import checked_shapes, family, names_of
from utils import UserError, atomic_write

__all__ = ['FLOAT_DTYPES', 'LLAMA3_PRES', 'PRE_SPLITS', 'Checkpoint', 'byte_spelling', 'detect', 'our_name', 'tensor_types', 'write', 'written_values']


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
    quantized_scales_dtype(name), the dtype quantized() gives the scales, for convert.py's plan, and
    gguf_type(name) and held_as(name), what the file holds a weight in and what it becomes here."""

    def __init__(self, path):
        self.path = path
        self._map = map_file(path)
        meta, infos, data_start = read_header(self._map, path)
        arch, kind = check_architecture(meta, path)
        self._table = table = names_of({"model_type": kind})
        entries = tensor_entries(infos, data_start, len(self._map), path)
        rope_freqs = entries.pop(ROPE_FREQS, None)
        if rope_freqs is not None:
            rope_freqs = self._floats(rope_freqs)
        # Tensors the family reads as configuration (Phi-3's LongRoPE factors): metadata for its from_gguf
        meta = {**meta, **{name: self._floats(entries.pop(name)) for name in getattr(family({"model_type": kind}),
                                                                                     "GGUF_TENSORS", ())
                           if name in entries}}
        self._entries = {}
        for gguf_name, entry in entries.items():
            name = our_name(table, gguf_name)
            if name is None:
                raise UserError(f"{path}: unexpected tensor {shown(gguf_name)} (not a {arch} weight)")
            self._entries[name] = entry
        self.config = derive_config(meta, self._entries, path, rope_freqs, arch)
        if arch != "llama":
            self.config["model_type"] = kind
        self.shapes = checked_shapes(self.config, path)
        check_tensors(self._entries, self.shapes, path, table)
        self._tokenizer_files = tokenizer_files(meta, path)

    def stored_dtype(self, name):
        return FLOAT_DTYPES.get(self._entries[name].type)

    def quantization(self, name):
        entry = self._entries[name]
        bits = HELD_BITS.get(entry.type)
        return (GROUP_SIZE, bits) if bits and len(entry.shape) == 2 else None

    def quantized(self, name):
        """(weight uint32 [out, in * bits / 32], scales [out, in / 32], biases [out, in / 32]):
        float16 scales and biases, or float32 where a bias (-8 d, -128 d) overflows float16, and
        for K-quants (d sc_j is exact in float32 only; Q6_K's 8-bit form is re-quantized)."""
        entry = self._entries[name]
        assert self.quantization(name), f"{name} is not stored in MLX's affine quantization"
        rows, cols = entry.shape
        if entry.type in kquants.EXACT_BITS:
            w, scales, biases = kquant_affine(self._raw(entry).reshape(rows, -1, entry.type_size), entry.type)
        elif entry.type in kquants.REQUANTIZED:
            w, scales, biases = requantized_affine(self._raw(entry).reshape(rows, -1), entry.type)
        else:
            w, scales, biases = mlx_affine(self._raw(entry).reshape(rows, cols // GROUP_SIZE, entry.type_size),
                                           entry.type)
        with np.errstate(invalid="ignore"):
            if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
                raise UserError(f"{self.path}: {entry.gguf_name} has blocks whose scale is NaN or infinite")
        return mx.array(w), mx.array(scales), mx.array(biases)

    def quantized_scales_dtype(self, name):
        """The dtype of quantized(name)'s scales and biases, read off the blocks' scales alone."""
        entry = self._entries[name]
        if entry.type in kquants.EXACT_BITS or entry.type in kquants.REQUANTIZED:
            return mx.float32
        d = block_scales(self._raw(entry).reshape(-1, entry.type_size))
        return mx.float32 if wide_scales(d, entry.type) else mx.float16

    def gguf_type(self, name):
        """The ggml type the file holds the weight in ("Q4_K", say)."""
        return self._entries[name].type

    def block_type(self, name):
        """The weight's type where its blocks can be kept as they are (ops.BLOCK_TYPES: a Q6_K
        matrix; convert.py keeps a linear's so), else None."""
        entry = self._entries[name]
        return entry.type if entry.type in ops.BLOCK_TYPES and len(entry.shape) == 2 else None

    def gguf_blocks(self, name):
        """Those blocks as the file holds them, uint8 [rows, cols / 256 * 210], their d checked finite."""
        entry = self._entries[name]
        blocks = self._raw(entry).reshape(entry.shape[0], -1)
        if not finite_values(blocks, entry.type):
            raise UserError(f"{self.path}: {entry.gguf_name} has blocks whose scale is NaN or infinite")
        return mx.array(blocks)

    def held_as(self, name):
        """What quantized() or tensor() makes of the weight, in words: "4-bit groups of 32 (exact)",
        "8-bit groups of 32 (re-quantized)", or a float type."""
        entry = self._entries[name]
        if entry.type in FLOAT_DTYPES:
            return FLOAT_DTYPES[entry.type]
        q = self.quantization(name)
        if q is None:
            return "float32"
        return f"{q[1]}-bit groups of {q[0]} ({'re-quantized' if entry.type in kquants.REQUANTIZED else 'exact'})"

    def tensor(self, name):
        plus = self._table.weight(name).gguf_plus
        return self._stored(name) - plus if plus else self._stored(name)

    def _stored(self, name):
        """The tensor's values as the file holds them."""
        entry = self._entries[name]
        raw = self._raw(entry)
        if entry.type == "BF16":
            return mx.array(raw.view(np.uint16).reshape(entry.shape)).view(mx.bfloat16)
        if entry.type in FLOAT_DTYPES:
            return mx.array(raw.view(FLOAT_DTYPES[entry.type]).reshape(entry.shape))
        if self.quantization(name) and entry.type not in kquants.REQUANTIZED:
            # d q + b in float32 is exactly GGUF's d (q - 8), d (q - 128), d q + m, d sc q - dmin m
            w, scales, biases = self.quantized(name)
            return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                 group_size=GROUP_SIZE, bits=HELD_BITS[entry.type])
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
