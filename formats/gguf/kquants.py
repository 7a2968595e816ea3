"""K-quant superblocks both ways: llama.cpp's Q4_K, Q5_K and Q6_K blocks to and from codes, scales and
biases in groups of 32 (blocks.py packs those as MLX does), and our own quantizers from float32.

A superblock holds 256 values. Q4_K and Q5_K: float16 d and dmin, 12 bytes of 6-bit scales sc_j and mins
m_j for 8 sub-blocks of 32, then the 4- or 5-bit codes q; each value is d sc_j q - dmin m_j. That is
MLX's affine quantization in groups of 32 with scale d sc_j and bias -dmin m_j, exactly, in float32:
d sc_j has up to 17 significant bits, which float32 holds and float16 does not. Q6_K (like Q3_K and
Q2_K) gives each 16 values a scale of their own, which groups of 32 cannot hold: a linear's Q6_K is
kept in its own blocks (ops.BLOCK_TYPES, models.BlockQuantizedLinear); otherwise their exact values
are re-quantized to 8 bits in groups of 32, min to max (requantized_8bit).

Back: a tensor still in a K-quant's form (its scales d sc_j with float16 d and 6-bit sc_j, its biases
likewise) gets its own superblocks again, bit for bit; anything else is quantized from float32 as
llama.cpp's reference quantizers do (quantize_row_q4_K_ref, q5_K's and q6_K's), vectorised over every
sub-block at once.
"""

import numpy as np

QK_K, SUB = 256, 32  # values in a superblock, in a Q4_K/Q5_K sub-block
EXACT_BITS = {"Q4_K": 4, "Q5_K": 5}  # exactly MLX's affine quantization in groups of 32
REQUANTIZED = ("Q6_K", "Q3_K", "Q2_K")  # 16-value sub-blocks: 8-bit groups of 32, re-quantized (Q6_K's
                                        # embeddings; its linears keep their blocks)
REQUANTIZED_BITS = 8
QUANTIZED_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # the types quantized_superblocks writes
TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# Where each type keeps its float16 super-scales (d and dmin; Q6_K's d comes last)
HEAD_BYTES = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}
SCALE_MAX = 63  # 6-bit sub-block scales and mins
GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp's: below it a sub-block is all zeros


# ----------------------------------------------------------------------------- layout

def halves(blocks_NB, start):
    """The float16 at byte `start` of each block, as float32."""
    return np.ascontiguousarray(blocks_NB[:, start:start + 2]).view(np.float16)[:, 0].astype(np.float32)


def unpacked_scales(packed_N12):
    """Q4_K's and Q5_K's 6-bit scales and mins of 8 sub-blocks, (sc [N, 8], m [N, 8]): bytes 0-3 hold
    sc 0-3, bytes 4-7 m 0-3, bytes 8-11 the low nibbles of sc 4-7 and m 4-7, whose top two bits sit
    in the top two bits of bytes 0-3 and 4-7."""
    low, mid, high = packed_N12[:, 0:4], packed_N12[:, 4:8], packed_N12[:, 8:12]
    sc = np.concatenate([low & 63, (high & 15) | (low >> 6 << 4)], axis=1)
    m = np.concatenate([mid & 63, (high >> 4) | (mid >> 6 << 4)], axis=1)
    return sc, m


def packed_scales(sc_N8, m_N8):
    """unpacked_scales undone: 12 bytes a superblock."""
    low = sc_N8[:, :4] | (sc_N8[:, 4:] >> 4 << 6)
    mid = m_N8[:, :4] | (m_N8[:, 4:] >> 4 << 6)
    high = (sc_N8[:, 4:] & 15) | ((m_N8[:, 4:] & 15) << 4)
    return np.concatenate([low, mid, high], axis=1)


def unpacked_codes(blocks_NB, type_name):
    """Each superblock's 256 codes in value order, uint8 [N, 256]: Q4_K's 0-15, Q5_K's 0-31, Q6_K's
    0-63 (q + 32)."""
    n = len(blocks_NB)
    if type_name == "Q6_K":  # per half of 128: ql's low then high nibbles, qh's 2-bit pairs, 32 values each
        ql_N2P32 = blocks_NB[:, :128].reshape(n, 2, 2, 32)
        low_N2K32 = np.concatenate([ql_N2P32 & 15, ql_N2P32 >> 4], axis=2)  # K = 2 nibble + part
        qh_N2132 = blocks_NB[:, 128:192].reshape(n, 2, 1, 32)
        high_N2K32 = (qh_N2132 >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        return (low_N2K32 | (high_N2K32 << 4)).reshape(n, QK_K)
    qs = blocks_NB[:, -128:].reshape(n, 4, 1, 32)  # 64 values a chunk: low nibbles, then high ones
    low_N256 = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(n, QK_K)
    if type_name == "Q4_K":
        return low_N256
    qh_N132 = blocks_NB[:, 16:48].reshape(n, 1, 32)  # bit j of byte l: sub-block j's value l
    high_N832 = (qh_N132 >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return low_N256 | (high_N832.reshape(n, QK_K) << 4)


def packed_codes(q_N256, type_name):
    """unpacked_codes undone: the bytes after a Q4_K/Q5_K head (Q5_K's qh, then qs), or Q6_K's ql and qh."""
    n = len(q_N256)
    if type_name == "Q6_K":
        q_N2K32 = q_N256.reshape(n, 2, 4, 32)
        low = q_N2K32 & 15
        ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(n, 128)
        qh = np.bitwise_or.reduce((q_N2K32 >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2)
        return np.concatenate([ql, qh.reshape(n, 64)], axis=1)
    q_N4232 = q_N256.reshape(n, 4, 2, 32)
    qs = ((q_N4232[:, :, 0] & 15) | ((q_N4232[:, :, 1] & 15) << 4)).reshape(n, 128)
    if type_name == "Q4_K":
        return qs
    high_N832 = (q_N256 >> 4).reshape(n, 8, 32)
    qh = np.bitwise_or.reduce(high_N832 << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([qh, qs], axis=1)


# ----------------------------------------------------------------------------- reading

def affine(blocks_NB, type_name):
    """Q4_K or Q5_K superblocks as codes uint8 [N, 256], scales d sc_j and biases -dmin m_j, float32
    [N, 8]: exactly the values llama.cpp dequantizes (one float32 rounding of d sc_j q - dmin m_j)."""
    d_N, dmin_N = halves(blocks_NB, 0), halves(blocks_NB, 2)
    sc_N8, m_N8 = unpacked_scales(blocks_NB[:, 4:16])
    with np.errstate(all="ignore"):  # a stranger's NaN or infinity is reported by the caller
        return unpacked_codes(blocks_NB, type_name), d_N[:, None] * sc_N8, -(dmin_N[:, None] * m_N8)


@np.errstate(all="ignore")
def requantized_8bit(values_RC):
    """Exact float32 values as 8-bit codes in groups of 32, min to max: (codes uint8 [R, C], scales
    [R, C/32], biases [R, C/32], float32), scale (max - min) / 255 and bias the minimum, so that every
    value is within half an 8-bit step. (MLX's own quantize moves its scale to hit zero exactly, and
    then misses the group's far end by up to a whole step: see docs/formats.md.)"""
    rows = len(values_RC)
    x_RGS = values_RC.reshape(rows, -1, SUB)
    lo_RG, hi_RG = x_RGS.min(axis=-1), x_RGS.max(axis=-1)
    scale_RG = (hi_RG - lo_RG) / np.float32(255)
    inverse_RG = np.where(scale_RG > 0, np.float32(1) / scale_RG, np.float32(0))
    q = np.clip(np.rint((x_RGS - lo_RG[..., None]) * inverse_RG[..., None]), 0, 255)
    return q.astype(np.uint8).reshape(rows, -1), scale_RG, lo_RG


# ----------------------------------------------------------------------------- exact superblocks back

@np.errstate(all="ignore")
def six_bit_split(v_N8):
    """(float16 d [N], uint8 k [N, 8]) with float32(d) * k == v exactly and 0 <= k <= 63, or None
    where some superblock has none. llama.cpp makes the largest k 63, so that is tried first."""
    n = len(v_N8)
    largest_N = v_N8[np.arange(n), np.abs(v_N8).argmax(axis=1)]
    d_N, k_N8 = np.zeros(n, np.float16), np.zeros((n, 8), np.uint8)
    found_N = np.all(v_N8 == 0, axis=1)  # d 0, k 0, as llama.cpp writes a zero superblock
    for k_max in range(SCALE_MAX, 0, -1):
        todo = np.flatnonzero(~found_N)
        if not len(todo):
            break
        d = (largest_N[todo] / np.float32(k_max)).astype(np.float16)
        k = np.rint(v_N8[todo] / d.astype(np.float32)[:, None])
        ok = (np.all((k >= 0) & (k <= SCALE_MAX), axis=1)
              & np.all(d.astype(np.float32)[:, None] * k == v_N8[todo], axis=1))
        d_N[todo[ok]], k_N8[todo[ok]] = d[ok], k[ok].astype(np.uint8)
        found_N[todo[ok]] = True
    return (d_N, k_N8) if found_N.all() else None


def superblock_heads(scales_RG, biases_RG, type_name):
    """Each superblock's head (d, dmin, 12 bytes of scales and mins), uint8 [R, G/8, 16], when the
    float32 scales and biases are a K-quant's (d sc_j, -dmin m_j); else None."""
    assert type_name in EXACT_BITS, type_name
    rows = len(scales_RG)
    scales = six_bit_split(scales_RG.reshape(-1, 8))
    mins = six_bit_split(np.negative(biases_RG.reshape(-1, 8)) + np.float32(0))  # -0.0 is a zero min
    if scales is None or mins is None:
        return None
    (d_N, sc_N8), (dmin_N, m_N8) = scales, mins
    return packed_heads(d_N, dmin_N, sc_N8, m_N8).reshape(rows, -1, 16)


def packed_heads(d_N, dmin_N, sc_N8, m_N8):
    """Q4_K/Q5_K heads, uint8 [N, 16]: float16 d and dmin, then the packed 6-bit scales and mins."""
    return np.concatenate([np.stack([d_N, dmin_N], axis=1).view(np.uint8), packed_scales(sc_N8, m_N8)], axis=1)


def superblocks(heads_NH, q_N256, type_name):
    """Whole superblocks, uint8 [N, type size]: a Q4_K/Q5_K head then its codes."""
    return np.concatenate([heads_NH, packed_codes(q_N256, type_name)], axis=1)


# ----------------------------------------------------------------------------- quantizing floats

SUPERBLOCKS_AT_ONCE = 4096  # 1M values: a chunk's temporaries stay in cache, several times faster


def quantized_superblocks(x_RC, type_name):
    """Float32 rows (a multiple of 256 values each) as Q4_K, Q5_K or Q6_K superblocks, uint8 [R, C/256*size]."""
    rows = len(x_RC)
    x_NV = np.ascontiguousarray(x_RC, np.float32).reshape(-1, QK_K)
    quantize = quantized_q6_k if type_name == "Q6_K" else lambda x: quantized_with_mins(x, type_name)
    with np.errstate(all="ignore"):  # NaN or infinity becomes a non-finite d, reported by the caller
        blocks = [quantize(x_NV[i:i + SUPERBLOCKS_AT_ONCE]) for i in range(0, len(x_NV), SUPERBLOCKS_AT_ONCE)]
    return np.concatenate(blocks).reshape(rows, -1)


# (nmax, rmin, rdelta, nstep) of llama.cpp's make_qkx2_quants search, per type
MIN_SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}


def quantized_with_mins(x_NV, type_name):
    """Q4_K/Q5_K as quantize_row_q4_K_ref does: each sub-block's best scale and min by a weighted
    least-squares search, the 8 of them quantized to 6 bits under float16 d and dmin, then every
    value's code recomputed from the rounded scales."""
    nmax = MIN_SEARCH[type_name][0]
    n = len(x_NV)
    x_BS = x_NV.reshape(-1, SUB)  # B = N * 8 sub-blocks
    weights_BS = np.sqrt(np.mean(x_BS * x_BS, axis=1, keepdims=True)) + np.abs(x_BS)
    scale_B, min_B, q_BS = scale_and_min_search(x_BS, weights_BS, *MIN_SEARCH[type_name])
    d_N, sc_N8 = six_bit_scales(scale_B.reshape(n, 8))
    dmin_N, m_N8 = six_bit_scales(min_B.reshape(n, 8))
    step_B = (d_N.astype(np.float32)[:, None] * sc_N8).reshape(-1)
    offset_B = (dmin_N.astype(np.float32)[:, None] * m_N8).reshape(-1)
    again = np.clip(np.rint((x_BS + offset_B[:, None]) / step_B[:, None]), 0, nmax)
    q_BS = np.where(step_B[:, None] != 0, again, q_BS)  # a zero scale keeps the search's codes, as llama.cpp
    return superblocks(packed_heads(d_N, dmin_N, sc_N8, m_N8), q_BS.astype(np.uint8).reshape(n, QK_K), type_name)


def six_bit_scales(v_N8):
    """Non-negative sub-block scales (or mins) as float16 d and 6-bit k, the largest k 63."""
    largest_N = np.maximum(v_N8.max(axis=1), 0)
    inverse_N = np.where(largest_N > 0, SCALE_MAX / largest_N, 0).astype(np.float32)
    k_N8 = np.clip(np.rint(inverse_N[:, None] * v_N8), 0, SCALE_MAX).astype(np.uint8)
    return (largest_N / np.float32(SCALE_MAX)).astype(np.float16), k_N8


def scale_and_min_search(x_BS, w_BS, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants over every sub-block at once: (scale [B], min [B] (subtracted, >= 0), codes
    [B, S]) minimising the weighted squared error of scale q - min, over nstep + 1 trial scales.
    Each trial's error comes from its sums (combined in float64), not from a pass over the values."""
    lo_B = np.minimum(x_BS.min(axis=1), 0)
    span_B = x_BS.max(axis=1) - lo_B
    flat_B = span_B == 0
    span_B = np.where(flat_B, 1, span_B)
    shifted_BS = x_BS - lo_B[:, None]
    sum_w, sum_x, sum_x2 = w_BS.sum(axis=1).astype(np.float64), rowdot(w_BS, x_BS), rowdot(w_BS * x_BS, x_BS)

    def codes(iscale_B):
        q_BS = np.multiply(iscale_B[:, None], shifted_BS)
        return np.clip(np.rint(q_BS, out=q_BS), 0, nmax, out=q_BS)

    def sums(q_BS):
        wq_BS = w_BS * q_BS
        return wq_BS.sum(axis=1).astype(np.float64), rowdot(wq_BS, q_BS), rowdot(wq_BS, x_BS)

    def error(scale, offset, sum_l, sum_l2, sum_xl):  # sum of w (scale q + offset - x)^2, expanded
        return (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl + offset * offset * sum_w
                - 2 * offset * sum_x + sum_x2)

    best_iscale = (nmax / span_B).astype(np.float32)
    scale_B, min_B = 1 / best_iscale.astype(np.float64), lo_B.astype(np.float64)
    best_B = error(scale_B, min_B, *sums(codes(best_iscale)))
    for step in range(nstep + 1):
        iscale = ((np.float32(rmin + rdelta * step) + nmax) / span_B).astype(np.float32)
        sum_l, sum_l2, sum_xl = sums(codes(iscale))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a min above zero is clamped, the scale refitted alone
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, 0, this_min)
        this_error = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (this_error < best_B)
        best_iscale, scale_B, min_B, best_B = (np.where(better, a, b) for a, b in (
            (iscale, best_iscale), (this_scale, scale_B), (this_min, min_B), (this_error, best_B)))
    q_BS = np.where(flat_B[:, None], 0, codes(best_iscale))
    return np.where(flat_B, 0, scale_B).astype(np.float32), -min_B.astype(np.float32), q_BS


def quantized_q6_k(x_NV):
    """Q6_K as quantize_row_q6_K_ref does: each 16 values' best signed scale (make_qx_quants), the 16
    scales quantized to int8 under a float16 d (the largest to -128), the codes recomputed from them."""
    n = len(x_NV)
    x_BS = x_NV.reshape(-1, 16)
    scale_B, q_BS = signed_scale_search(x_BS, 32)
    scale_N16 = scale_B.reshape(n, 16)
    largest_N = scale_N16[np.arange(n), np.abs(scale_N16).argmax(axis=1)]
    zero_N = np.abs(largest_N) < GROUP_MAX_EPS
    iscale_N = np.where(zero_N, 0, np.float32(-128) / np.where(zero_N, 1, largest_N)).astype(np.float32)
    d_N = np.where(zero_N, 0, 1 / np.where(zero_N, 1, iscale_N)).astype(np.float16)
    sc_N16 = np.clip(np.rint(iscale_N[:, None] * scale_N16), -128, 127).astype(np.int8)
    step_B = (d_N.astype(np.float32)[:, None] * sc_N16).reshape(-1)
    again = np.clip(np.rint(x_BS / np.where(step_B == 0, 1, step_B)[:, None]), -32, 31) + 32
    q_BS = np.where(step_B[:, None] != 0, again, q_BS)
    q_BS = np.where(np.repeat(zero_N, 16)[:, None], 0, q_BS)  # a zero superblock is all zero bytes
    return np.concatenate([packed_codes(q_BS.astype(np.uint8).reshape(n, QK_K), "Q6_K"), sc_N16.view(np.uint8),
                           d_N[:, None].view(np.uint8)], axis=1)


def signed_scale_search(x_BS, nmax):
    """make_qx_quants (weights x^2) over every sub-block at once: (scale [B], codes q + nmax [B, S]),
    the scale refitted by least squares over 19 trial scales around -nmax / (the largest |x|)."""
    b = len(x_BS)
    largest_B = x_BS[np.arange(b), np.abs(x_BS).argmax(axis=1)]
    zero_B = np.abs(largest_B) < GROUP_MAX_EPS
    largest_B = np.where(zero_B, 1, largest_B)
    w_BS = x_BS * x_BS
    wx_BS = w_BS * x_BS

    def codes(iscale_B):
        q_BS = np.multiply(iscale_B[:, None], x_BS)
        return np.clip(np.rint(q_BS, out=q_BS), -nmax, nmax - 1, out=q_BS)

    def sums(q_BS):
        return rowdot(wx_BS, q_BS), rowdot(w_BS * q_BS, q_BS)

    best_iscale = (-nmax / largest_B).astype(np.float32)
    sum_lx, sum_l2 = sums(codes(best_iscale))
    scale_B = np.where(sum_l2 > 0, sum_lx / sum_l2, 0)
    best_B = scale_B * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(nmax + np.float32(0.1) * step) / largest_B).astype(np.float32)
        lx, l2 = sums(codes(iscale))
        better = (l2 > 0) & (lx * lx > best_B * l2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale_B = np.where(better, lx / l2, scale_B)
        best_B = np.where(better, scale_B * lx, best_B)
    return np.where(zero_B, 0, scale_B).astype(np.float32), np.where(zero_B[:, None], 0, codes(best_iscale) + nmax)


def rowdot(a_BS, b_BS):
    """Each row's dot product, summed in float32 (einsum: no temporary) and handed on as float64."""
    return np.einsum("bs,bs->b", a_BS, b_BS).astype(np.float64)
