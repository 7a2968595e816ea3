"""Writing: any checkpoint of this toolkit as a llama GGUF file, the reader's mapping inverted,
converted and written a few rows at a time.
"""

import collections
import contextlib
import math
import os

import numpy as np

from formats.gguf import kquants
from formats.gguf.blocks import FLOAT_DTYPES, GROUP_SIZE, tensor_chunks
from formats.gguf.config import DEFAULT_CONTEXT, exported_rope_freqs, norm_eps_key
from formats.gguf.names import ROPE_FREQS, gguf_name
from formats.gguf.vocabulary import add_vocabulary, exported_vocabulary
from models import family, hook, names_of
from models.layers import rope_dims
from utils import UserError

# The ggml types written, and what chooses them: a float dtype, or a bit width (quantizable rows).
WRITTEN_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", *kquants.QUANTIZED_TYPES)
# A GGUF file's types a weight held as that file quantized it is written back in (gguf_type(name))
SOURCE_TYPES_KEPT = ("Q5_0", "Q5_1", *kquants.QUANTIZED_TYPES)
DTYPE_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
BITS_TYPES = {4: "Q4_1", 8: "Q8_0"}
# general.file_type (llama.cpp's "mostly" types: K-quants as their _M mixes)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17,
              "Q6_K": 18, "BF16": 32}


def tensor_types(checkpoint, dtype=None, bits=None):
    """{name: ggml type name} each weight is written in: norms in F32 always; 2-D weights in `dtype`
    ("float32", "float16", "bfloat16"), or quantized to `bits` (4: Q4_1, 8: Q8_0; rows that are not
    whole blocks of 32 in `dtype`, else F16), or by default as the checkpoint holds them: MLX's 2-
    to 4-bit quantization as Q4_1, 6- and 8-bit as Q8_0 (the nearest type at least as precise),
    but a weight a GGUF file held in Q5_0, Q5_1, Q4_K, Q5_K or Q6_K in that type again (the
    checkpoint's gguf_type(name), where it has one), floats in their stored type."""
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
    source = getattr(checkpoint, "gguf_type", lambda name: None)(name)  # formats without one: None
    blocks = getattr(checkpoint, "block_type", lambda name: None)(name)  # held in GGUF blocks (Q6_K)
    if (q is not None or blocks is not None) and source in SOURCE_TYPES_KEPT:
        return source
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
    # Float32 tensors that are configuration, not weights: Llama 3.1's rope_freqs, the family's own
    extra = {**({ROPE_FREQS: rope_freqs} if rope_freqs is not None else {}),
             **hook(family(checkpoint.config), "gguf_tensors")(checkpoint.config)}
    writer = gguf.GGUFWriter(path, family(checkpoint.config).GGUF_ARCH)
    table = names_of(checkpoint.config)
    add_model_metadata(writer, checkpoint, types)
    add_vocabulary(writer, vocab)
    infos = [(name, values.shape, "F32") for name, values in extra.items()] + \
        [(gguf_name(table, name), shape, types[name]) for name, shape in checkpoint.shapes.items()]
    for name, shape, type_name in infos:
        qtype = gguf.GGMLQuantizationType[type_name]
        rows, cols = math.prod(shape[:-1]), shape[-1]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, (*shape[:-1], cols // block * type_size), np.uint8,
                               rows * (cols // block) * type_size, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # Tensor data written straight to the writer's file: its write_tensor_data takes a whole tensor
        f = writer.fout[0]
        for values in extra.values():
            write_tensor(writer, f, [values.view(np.uint8)])
        stored = AsStored(checkpoint, table)
        for name in checkpoint.shapes:
            write_tensor(writer, f, tensor_chunks(stored, name, types[name]))
        writer.close()
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


class AsStored:
    """A checkpoint whose tensors read as GGUF holds them: plus the table's gguf_plus (Gemma's norms)."""

    def __init__(self, checkpoint, table):
        self.checkpoint, self.table = checkpoint, table

    def __getattr__(self, name):
        return getattr(self.checkpoint, name)

    def tensor(self, name):
        plus = self.table.weight(name).gguf_plus
        return self.checkpoint.tensor(name) + plus if plus else self.checkpoint.tensor(name)


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
    if config.get("sliding_window") is not None and family(config).GGUF_ARCH == "llama":
        raise UserError(f"{checkpoint.path}: a sliding window of {config['sliding_window']} tokens (Mistral): "
                        "llama.cpp's llama architecture has none, so its GGUF would compute another model")
    scaling = config.get("rope_scaling")
    # A family's own scalings, its to_gguf writes
    writable = ("linear", "llama3", *getattr(family(config), "ROPE_SCALINGS", {}))
    if scaling is not None and scaling.get("rope_type") not in writable:
        raise UserError(f"{checkpoint.path}: RoPE scaling {scaling.get('rope_type')!r} cannot be written to GGUF "
                        f"(supported: {', '.join(writable)})")
    assert types.keys() == checkpoint.shapes.keys(), "a type for every weight"
    for name, shape in checkpoint.shapes.items():
        assert types[name] in WRITTEN_TYPES, (name, types[name])
        assert len(shape) == 2 or types[name] == "F32", f"{name}: llama.cpp keeps norms in F32"
        block = kquants.QK_K if types[name] in kquants.QUANTIZED_TYPES else GROUP_SIZE
        assert types[name] in FLOAT_DTYPES or shape[-1] % block == 0, f"{name}: rows not whole blocks"


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
    writer.add_rope_dimension_count(rope_dims(c))
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_float32(f"{writer.arch}.{norm_eps_key(family(c))}", c["norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    scaling = c.get("rope_scaling")
    if scaling is not None and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    hook(family(c), "to_gguf")(writer, c)


def model_name(path):
    """general.name: the model folder's name (a file's, without its extension)."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.splitext(name)[0] if os.path.isfile(path) else name
