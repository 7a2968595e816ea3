"""Quantized blocks both ways, each codec beside its inverse: GGUF's Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1
blocks, and K-quant superblocks (kquants.py), as MLX's affine quantization in groups of 32 (reading),
and MLX's back into Q8_0, Q5_0, Q5_1, Q4_1 and K-quant blocks or floats (writing), a few rows at a time.
"""

import mlx.core as mx
import numpy as np

from formats import all_finite_bits
from formats.gguf import kquants
from utils import UserError

FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MLX_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}  # exactly MLX's affine quantization, groups of 32
BIAS_OFFSETS = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}  # their values are d (q - offset): bias -offset d
GROUP_SIZE, F16_MAX = 32, 65504.0
# The bits each quantized type is held in as MLX's affine quantization, groups of 32
HELD_BITS = {**MLX_BITS, **kquants.EXACT_BITS, **dict.fromkeys(kquants.REQUANTIZED, kquants.REQUANTIZED_BITS)}
# Bytes a block, and where its float16 scales lie (checked finite when written)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, **kquants.TYPE_SIZES}
SCALE_BYTES = {"Q8_0": slice(0, 2), "Q4_0": slice(0, 2), "Q4_1": slice(0, 4), "Q5_0": slice(0, 2),
               "Q5_1": slice(0, 4), **kquants.HEAD_BYTES}


@np.errstate(all="ignore")  # a stranger's NaN or infinity: no warnings printed
def mlx_affine(blocks_RGB, type_name):
    """GGUF blocks of 32 values as MLX's affine quantization: (weight uint32 [R, G*32*bits/32],
    scales [R, G], biases [R, G]), so that d q + b is each value."""
    d_RG = block_scales(blocks_RGB)
    if type_name in ("Q4_1", "Q5_1"):  # d, m, then the codes: d q + m
        m_RG = np.ascontiguousarray(blocks_RGB[..., 2:4]).view(np.float16)[..., 0]
        codes = mlx_nibbles(blocks_RGB[..., 4:]) if type_name == "Q4_1" else mlx_fives(blocks_RGB[..., 4:])
        return codes, d_RG, m_RG
    if type_name == "Q4_0":
        q = mlx_nibbles(blocks_RGB[..., 2:])
    elif type_name == "Q5_0":
        q = mlx_fives(blocks_RGB[..., 2:])
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


def mlx_fives(qh_qs_RG20):
    """Q5 blocks' 5-bit values (after d, or d and m) in MLX's 5-bit packing, as uint32 words
    [R, G*5]. GGUF keeps the low four bits as Q4's nibbles do, and bit j of the little-endian
    word qh is value j's fifth."""
    qh_RG = np.ascontiguousarray(qh_qs_RG20[..., :4]).view("<u4")[..., 0]
    qs_RG16 = qh_qs_RG20[..., 4:]
    low_RG32 = np.concatenate([qs_RG16 & 0x0F, qs_RG16 >> 4], axis=-1)
    high_RG32 = ((qh_RG[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return mlx_packed((low_RG32 | (high_RG32 << 4)).reshape(len(qh_qs_RG20), -1), 5)


def mlx_packed(values_RN, bits):
    """Codes of `bits` bits as MLX packs them, uint32 words [R, N*bits/32]: one little-endian stream
    of bits, value i at bit bits*i (so 8 values fill `bits` bytes)."""
    rows = len(values_RN)
    if bits == 8:
        return np.ascontiguousarray(values_RN, np.uint8).reshape(rows, -1).view(np.uint32)
    values_RE8 = values_RN.reshape(rows, -1, 8).astype(np.uint64)
    stream_RE = np.bitwise_or.reduce(values_RE8 << (bits * np.arange(8, dtype=np.uint64)), axis=-1)
    bytes_REb = stream_RE[..., None].astype("<u8").view(np.uint8)[..., :bits]
    return np.ascontiguousarray(bytes_REb).reshape(rows, -1).view(np.uint32)


def mlx_unpacked(words_RW, bits):
    """mlx_packed undone: the codes, uint8 [R, W*32/bits]."""
    rows = len(words_RW)
    bytes_REb = np.ascontiguousarray(words_RW).view(np.uint8).reshape(rows, -1, bits)
    padded_RE8 = np.zeros(bytes_REb.shape[:-1] + (8,), np.uint8)
    padded_RE8[..., :bits] = bytes_REb
    stream_RE = padded_RE8.view("<u8")[..., 0]
    values_RE8 = (stream_RE[..., None] >> (bits * np.arange(8, dtype=np.uint64))) & ((1 << bits) - 1)
    return values_RE8.astype(np.uint8).reshape(rows, -1)


def kquant_affine(blocks_RSB, type_name):
    """Q4_K or Q5_K superblocks [R, S, B] as MLX's affine quantization in groups of 32, exactly:
    (weight uint32 [R, S*256*bits/32], scales float32 [R, S*8], biases float32 [R, S*8])."""
    rows = len(blocks_RSB)
    codes, scales, biases = kquants.affine(blocks_RSB.reshape(-1, blocks_RSB.shape[-1]), type_name)
    return mlx_packed(codes.reshape(rows, -1), kquants.EXACT_BITS[type_name]), *(
        a.reshape(rows, -1) for a in (scales, biases))


@np.errstate(all="ignore")  # a stranger's NaN or infinity is reported by the caller, in the scales
def requantized_affine(rows_RB, type_name):
    """Rows of Q6_K (or Q3_K, Q2_K) superblocks as MLX's 8-bit affine quantization in groups of 32,
    re-quantized from their exact values a few rows at a time: (weight uint32 [R, C/4], scales
    float32 [R, C/32], biases float32 [R, C/32])."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    values_per_row = rows_RB.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * kquants.QK_K
    step = max(1, CHUNK_VALUES // values_per_row)
    parts = [kquants.requantized_8bit(gguf.quants.dequantize(rows_RB[start:start + step], qtype))
             for start in range(0, len(rows_RB), step)]
    codes, scales, biases = (np.concatenate(arrays) for arrays in zip(*parts))
    return mlx_packed(codes, 8), scales, biases


def gguf_nibbles(packed_RG16):
    """MLX's 4-bit values (values 2b and 2b+1 in byte b of a group) in GGUF's block order (value j
    in byte j's low nibble, value j+16 in its high one): mlx_nibbles undone."""
    values_RG32 = np.empty(packed_RG16.shape[:-1] + (32,), np.uint8)
    values_RG32[..., 0::2], values_RG32[..., 1::2] = packed_RG16 & 0x0F, packed_RG16 >> 4
    return values_RG32[..., :16] | (values_RG32[..., 16:] << 4)


CHUNK_VALUES = 1 << 22  # rows converted at a time: about 16 MiB of float32, whatever the tensor


def tensor_chunks(checkpoint, name, type_name):
    """The weight's bytes in `type_name`, as uint8 arrays of a few rows each."""
    own = held_block_chunks(checkpoint, name, type_name) or own_code_blocks(checkpoint, name, type_name)
    if own is not None:
        yield from own
        return
    chunks = kquant_chunks if type_name in kquants.QUANTIZED_TYPES else converted_chunks
    for out in chunks(checkpoint, name, type_name):
        if not finite_values(out, type_name):
            raise UserError(f"{checkpoint.path}: {name} is not finite in {type_name}: NaN, infinity, or values "
                            "beyond that type's range" + (" (try float32 or bfloat16)" if type_name == "F16" else ""))
        yield out.view(np.uint8)


def held_block_chunks(checkpoint, name, type_name):
    """The blocks a weight is held in (gguf_blocks: a kept Q6_K's), as they are, a few rows at a
    time; None unless they are `type_name`'s."""
    if getattr(checkpoint, "block_type", lambda name: None)(name) != type_name:
        return None
    blocks = checkpoint.gguf_blocks(name)
    mx.eval(blocks)  # read once, whole: slices of an unread array would each read it
    step = max(1, CHUNK_VALUES // checkpoint.shapes[name][-1])
    return (np.asarray(blocks[start:start + step]) for start in range(0, blocks.shape[0], step))


def converted_chunks(checkpoint, name, type_name):
    """The weight cast to a float type, or quantized from float32 by the gguf package."""
    import gguf

    for rows in weight_rows(checkpoint, name):
        if type_name in FLOAT_DTYPES:
            bits = {"F32": mx.uint32, "F16": mx.uint16, "BF16": mx.uint16}[type_name]
            yield np.asarray(rows.astype(getattr(mx, FLOAT_DTYPES[type_name])).view(bits))
        else:
            with np.errstate(all="ignore"):  # NaN or infinity is reported by the caller, in the result
                yield gguf.quants.quantize(np.asarray(rows.astype(mx.float32)), gguf.GGMLQuantizationType[type_name])


def kquant_chunks(checkpoint, name, type_name):
    """The weight as K-quant superblocks: its own, bit for bit, where it is held as that K-quant was
    read (exact_superblock_chunks); else quantized from its float32 values (a fused weight's, or a
    Q6_K's held in 8 bits) by our own quantizer."""
    exact = exact_superblock_chunks(checkpoint, name, type_name)
    if exact is not None:
        yield from exact
        return
    values = checkpoint.tensor(name).astype(mx.float32)
    mx.eval(values)  # read once, whole: slices of an unread array would each read it
    step = max(1, CHUNK_VALUES // values.shape[-1])
    for start in range(0, values.shape[0], step):
        yield kquants.quantized_superblocks(np.asarray(values[start:start + step]), type_name)


def exact_superblock_chunks(checkpoint, name, type_name):
    """Chunks of the superblocks a weight held in MLX's 4- or 5-bit groups of 32 came from: None
    unless every scale is d sc_j and every bias -dmin m_j (float16 d, dmin; 6-bit sc_j, m_j)."""
    bits = kquants.EXACT_BITS.get(type_name)
    if bits is None or checkpoint.quantization(name) != (GROUP_SIZE, bits):
        return None
    w, scales, biases = checkpoint.quantized(name)
    heads_RSH = kquants.superblock_heads(*(np.asarray(a.astype(mx.float32)) for a in (scales, biases)), type_name)
    if heads_RSH is None:
        return None
    mx.eval(w)  # read once, whole: slices of an unread array would each read it
    return superblock_chunks(w, heads_RSH, bits, type_name)


def superblock_chunks(w, heads_RSH, bits, type_name):
    """Superblocks of a few rows at a time: each head, then its codes unpacked from MLX's words."""
    rows, superblocks = heads_RSH.shape[:2]
    step = max(1, CHUNK_VALUES // (superblocks * kquants.QK_K))
    for start in range(0, rows, step):
        codes_RC = mlx_unpacked(np.asarray(w[start:start + step]), bits)
        heads_NH = heads_RSH[start:start + step].reshape(-1, heads_RSH.shape[-1])
        blocks = kquants.superblocks(heads_NH, codes_RC.reshape(-1, kquants.QK_K), type_name)
        yield blocks.reshape(len(codes_RC), -1)


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
    """Whether a float tensor's bits, or a quantized one's block scales (d, and Q4_1's m, K-quants'
    dmin), are finite."""
    if type_name in FLOAT_DTYPES:
        return all_finite_bits(out, FLOAT_DTYPES[type_name])
    scales = out.reshape(-1, BLOCK_BYTES[type_name])[:, SCALE_BYTES[type_name]]
    return bool(np.all(np.isfinite(np.ascontiguousarray(scales).view(np.float16))))


OWN_CODE_BITS = {"Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}  # the 32-blocks written from MLX's own codes


def own_code_blocks(checkpoint, name, type_name):
    """The weight's own codes as Q4_1, Q5_0, Q5_1 or Q8_0 blocks, chunks of rows, when it is held in
    MLX's affine quantization in groups of 32 (Q5_0, Q8_0: biases -16 and -128 scale, as the reader
    makes of them); else None, and it is quantized from float32. Scales float16 holds are copied
    exactly; others are rounded to float16, which moves a value far less than re-quantizing would
    (a step's 2^-11 against half a step)."""
    bits = OWN_CODE_BITS.get(type_name)
    if bits is None or checkpoint.quantization(name) != (GROUP_SIZE, bits):
        return None
    w, scales, biases = checkpoint.quantized(name)
    s_RG, b_RG = (np.asarray(a.astype(mx.float32)) for a in (scales, biases))
    d_RG = finite_float16(s_RG)
    if d_RG is None:
        return None
    if type_name in ("Q4_1", "Q5_1"):
        m_RG = finite_float16(b_RG)
        if m_RG is None:
            return None
        heads_RGB = np.stack([d_RG, m_RG], axis=-1).view(np.uint8)  # d, m: two float16 each block
    else:
        if not np.array_equal(b_RG, -BIAS_OFFSETS[type_name] * s_RG):  # exact in float32: a power of two
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
        elif type_name == "Q8_0":  # MLX's q + 128, unsigned: Q8_0's signed q is the same bits, top one flipped
            codes_RGB = words.view(np.uint8).reshape(n, groups, 32) ^ np.uint8(0x80)
        else:
            codes_RGB = gguf_fives(mlx_unpacked(words, 5).reshape(n, groups, 32))
        yield np.concatenate([heads, codes_RGB], axis=-1).reshape(n, -1)


def gguf_fives(values_RG32):
    """5-bit values as a Q5 block's qh (bit j of a little-endian word: value j's fifth bit) and qs
    (Q4's nibbles): mlx_fives undone."""
    qh_RG = np.bitwise_or.reduce((values_RG32 >> 4).astype("<u4") << np.arange(32, dtype="<u4"), axis=-1)
    qs_RG16 = (values_RG32[..., :16] & 0x0F) | ((values_RG32[..., 16:] & 0x0F) << 4)
    return np.concatenate([qh_RG[..., None].view(np.uint8), qs_RG16], axis=-1)


def finite_float16(a):
    """`a` rounded to float16, or None where a value is beyond float16's range."""
    with np.errstate(over="ignore"):
        half = a.astype(np.float16)
    return half if np.all(np.isfinite(half)) else None
