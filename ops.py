"""The operations the model calls, run by the CPU kernels where they apply.

On the CPU, MLX lacks what decoding, QLoRA and the loss are bound by: it runs a
one-row product as a GEMM that repacks the whole weight, its quantized matmul
and its exp are single-threaded scalar loops, and mx.fast's norm, RoPE and
attention are compositions of many small operations. The compiled kernels
(cpu_kernels/, built by setup.sh) do these in one multi-threaded pass each.

One rule decides where a kernel runs: the kernels are built, MLX computes on
the CPU, the arrays are float32, and for the decoding kernels the input has at
most FEW_ROWS rows. Everywhere else (a GPU, float16 computation, a machine
without a compiler) each op is MLX's own. MLX_LORA_CPU_KERNELS=0 turns the
kernels off, to compare against plain MLX.

The products of a layer's input with its frozen weight run in float32 (BLAS), or
with both rounded to bfloat16 on the CPU's AMX tiles, float32 sums, after
use_bfloat16_products() (`--compute-dtype bfloat16` on such a CPU): what
PyTorch's CPU autocast computes. Everything else stays float32.

Shapes: B batch, T queries, S keys, N query heads, K key/value heads, H head dim.
"""

import functools
import os
import sys
from dataclasses import dataclass

import utils  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn


KERNELS_API_VERSION = 10  # what this ops.py calls: bindings.cpp's API_VERSION


def _load_kernels():
    if os.environ.get("MLX_LORA_CPU_KERNELS", "1") == "0":
        return None
    try:
        import _cpu_kernels
    except ImportError:  # not built (or built for another MLX): plain MLX ops
        return None
    if getattr(_cpu_kernels, "API_VERSION", 1) != KERNELS_API_VERSION:
        print(f"warning: {_cpu_kernels.__file__} was built from other sources: plain MLX ops run "
              "(rerun setup.sh)", file=sys.stderr)
        return None
    return _cpu_kernels


kernels = _load_kernels()
FEW_ROWS = 16  # up to this many rows (decoding), each weight is read once by the matvec kernels


def active():
    """The kernels run here: they are built and MLX computes on the CPU."""
    return kernels is not None and mx.default_device() == mx.cpu


def _applies(*float32_arrays, rows=None):
    """The one rule: active, every array float32, and at most FEW_ROWS rows when `rows` counts."""
    return (active() and all(a.dtype == mx.float32 for a in float32_arrays)
            and (rows is None or rows <= FEW_ROWS))


def _rows(x):
    return x.size // x.shape[-1]


_bfloat16_products = False


def bfloat16_products_available():
    """The CPU kernels run here and this CPU lends them AMX's bfloat16 tiles."""
    return active() and kernels.bf16_products()


def use_bfloat16_products(on=True):
    """From now on, the frozen weights' products of many rows in bfloat16 on AMX tiles."""
    global _bfloat16_products
    if on and not bfloat16_products_available():
        raise ValueError("bfloat16 products need the CPU kernels and a CPU with AMX bfloat16 tiles")
    _bfloat16_products = on


def bfloat16_products_used():
    """Whether the frozen products run in bfloat16 now (use_bfloat16_products)."""
    return _bfloat16_products


def _bfloat16_applies(x):
    return _bfloat16_products and _applies(x, rows=None) and _rows(x) > FEW_ROWS


def reads_float16_weights():
    """Whether a float16 weight can stay float16 under float32 computation: the matvec
    kernel reads it as it is (half the bytes a decoded token), and a prompt widens it
    on every thread."""
    return active()


def _reuse_freed_buffers():
    """MLX's CPU allocator keeps only 32 MiB of freed buffers; bigger ones go back to
    the OS and come back zeroed page by page. Keep up to a quarter of the memory
    limit, as its Metal backend keeps up to all of it."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(mx.get_memory_limit() // 4)


_reuse_freed_buffers()


# ----------------------------------------------------------------------------- products

def linear(x, weight):
    """x @ weight.T, float32 x; weight float32, or float16 kept for generation."""
    if _matvec_applies(x, [weight]):
        return kernels.matvec(x, weight)
    if _bfloat16_applies(x):
        return kernels.bf16_matmul(x, weight, True)
    if weight.dtype == mx.float16 and _applies(x):
        return _widened_matmul(x, weight)  # a prompt's many rows: widen, then BLAS
    return x @ weight.T


def quantized_linear(x, weight, scales, biases, group_size, bits):
    """x @ dequantize(weight).T for MLX's affine quantization, at each of its widths (2, 3, 4, 5, 6, 8 bits)."""
    if _applies(x, scales, biases):
        if _rows(x) <= FEW_ROWS:
            return kernels.quantized_matvec(x, weight, scales, biases, group_size, bits)
        return _dequantized_matmul(group_size, bits, _bfloat16_products)(x, weight, scales, biases)
    return mx.quantized_matmul(x, weight, scales=scales, biases=biases, transpose=True,
                               group_size=group_size, bits=bits)


def projections(x, layers):
    """[layer(x) for layer in layers]; when decoding with plain bias-free linears, one
    pass over all their weights (one start of the threads, not one each)."""
    weights = [layer.weight for layer in layers if isinstance(layer, nn.Linear) and "bias" not in layer]
    if len(weights) == len(layers) and _matvec_applies(x, weights):
        return kernels.matvecs(x, weights)
    return [layer(x) for layer in layers]


def _matvec_applies(x, weights):
    return (_applies(x, rows=_rows(x)) and weights[0].dtype in (mx.float32, mx.float16)
            and all(w.dtype == weights[0].dtype for w in weights))


def _frozen_matmul(dense, bfloat16=False):
    """x @ dense(*stored).T whose backward calls `dense` again instead of keeping the
    float32 weight from forward to backward: a quantized or float16 frozen base keeps
    its memory saving. The stored arrays take no gradient. Both products in BLAS, or
    with `bfloat16`, on AMX tiles.

    Each dense weight depends on the activation it multiplies: depending on leaves
    alone, MLX may make every layer's dense weight first and hold them all at once."""

    def dense_after(activation, stored):
        return dense(*mx.depends(list(stored), [activation]))

    def product(a, w, transposed):
        if bfloat16:
            return kernels.bf16_matmul(a, w, transposed)
        return a @ (w.T if transposed else w)

    @mx.custom_function
    def matmul(x, *stored):
        return product(x, dense_after(x, stored), True)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, *stored = primals
        return (product(cotangent, dense_after(cotangent, stored), False), *map(mx.zeros_like, stored))

    return matmul


def dequantize(weight, scales, biases, group_size, bits):
    """MLX's affine-quantized weight as float32 [out, in]: the kernel, threaded, where it applies
    (MLX's CPU dequantize takes one value at a time: 26 ms for a 5-bit 2816 x 1024 weight, 0.25)."""
    if _applies(scales, biases):
        return kernels.dequantize(weight, scales, biases, group_size, bits, mx.float32)
    return mx.dequantize(weight, scales, biases, group_size, bits)


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size, bits, bfloat16):
    dtype = mx.bfloat16 if bfloat16 else mx.float32  # bfloat16: rounded once, half the bytes to pack
    return _frozen_matmul(lambda w, scales, biases: kernels.dequantize(w, scales, biases, group_size, bits, dtype),
                          bfloat16)


_widened_matmul = _frozen_matmul(lambda w: kernels.to_float32(w))


# ----------------------------------------------------------------------------- GGUF's own blocks

# The GGUF types a linear's weight is held in as the file's blocks, uint8 [N, K / values * bytes]:
# (values, bytes) a block. Q6_K's 16-value sub-blocks have scales of their own, which no MLX
# quantization holds exactly (formats/gguf/kquants.py).
BLOCK_TYPES = {"Q6_K": (256, 210)}


def dequantize_blocks(blocks, gguf_type, dtype=mx.float32):
    """The dense matrix [N, K] of GGUF blocks uint8 [N, K / 256 * 210], exactly as llama.cpp reads
    them: the kernel, or the same in MLX ops (every backend)."""
    if active() and dtype in (mx.float32, mx.bfloat16):
        return kernels.dequantize_blocks(blocks, gguf_type, dtype)
    return _q6_k_values(blocks).astype(dtype)


def _q6_k_values(blocks_NB):
    """Q6_K in MLX ops, float32 [N, K]: value v of a superblock (d sc[v / 16]) (q - 32), q's low
    nibbles in ql (bytes 0-127), its top two bits in qh (128-191), then 16 int8 sc and float16 d.
    Per half of 128 values: ql's low nibbles, then its high ones, 64 values each, qh's bit pairs
    0-1, 2-3, 4-5, 6-7 on top of values 0-31, 32-63, 64-95, 96-127 (as kquants.unpacked_codes)."""
    n = blocks_NB.shape[0]
    b_NSB = blocks_NB.reshape(n, -1, BLOCK_TYPES["Q6_K"][1])
    s = b_NSB.shape[1]
    ql_NS2P32 = b_NSB[..., :128].reshape(n, s, 2, 2, 32)
    low_NS2K32 = mx.concatenate([ql_NS2P32 & 15, ql_NS2P32 >> 4], axis=3)  # K: nibble, then ql's part
    qh_NS2132 = b_NSB[..., 128:192].reshape(n, s, 2, 1, 32)
    high_NS2K32 = (qh_NS2132 >> mx.array([0, 2, 4, 6], mx.uint8)[:, None]) & 3
    q_NS16 = (low_NS2K32 | (high_NS2K32 << 4)).reshape(n, s, 16, 16).astype(mx.float32) - 32
    sc_NS = mx.contiguous(b_NSB[..., 192:208]).view(mx.int8).astype(mx.float32)
    d_NS = mx.contiguous(b_NSB[..., 208:210]).view(mx.float16).astype(mx.float32)
    step_NS = d_NS * sc_NS  # rounded once, as the references round it
    return (step_NS[..., None] * q_NS16).reshape(n, -1)


def block_linear(x, blocks, gguf_type):
    """x @ dequantize_blocks(blocks).T for a frozen weight held in GGUF blocks: the dense weight
    made for the product (in forward, and again in backward) and never kept."""
    if _applies(x, rows=_rows(x)):  # decoding: straight from the blocks, no dense copy
        return kernels.block_matvec(x, blocks, gguf_type)
    return _block_matmul(gguf_type, x.dtype, _bfloat16_applies(x))(x, blocks)


@functools.cache
def _block_matmul(gguf_type, dtype, bfloat16):
    dense_dtype = mx.bfloat16 if bfloat16 else dtype
    return _frozen_matmul(lambda blocks: dequantize_blocks(blocks, gguf_type, dense_dtype), bfloat16)


# ----------------------------------------------------------------------------- element-wise and the loss

def cross_entropy(logits, targets):
    """Cross-entropy along the last axis."""
    if _applies(logits):
        return kernels.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets)


def swiglu(a, b):
    """silu(a) * b, LLaMA's gated feed-forward."""
    if _applies(a, b):
        return kernels.gate(a, b, False)
    return nn.silu(a) * b


def swiglu_halves(ab):
    """silu(a) * b of the halves of ab [..., 2C] (Phi-3's gate_up_proj): one kernel pass each way,
    where a split would copy both halves and its gradient concatenate them again."""
    if _applies(ab):
        return kernels.gate_halves(ab, False)
    return swiglu(*mx.split(ab, 2, axis=-1))


def geglu(a, b):
    """gelu(a) * b with the tanh GELU, Gemma's gated feed-forward."""
    if _applies(a, b):
        return kernels.gate(a, b, True)
    return _compiled_geglu(a, b)


def gelu(a):
    """gelu(a) with the tanh GELU, GPT-2's ungated feed-forward."""
    if _applies(a):
        return kernels.gelu(a)
    return _compiled_gelu(a)


@functools.partial(mx.compile, shapeless=True)
def _compiled_gelu(a):
    return nn.gelu_approx(a)


@functools.partial(mx.compile, shapeless=True)
def _compiled_geglu(a, b):
    """Without the kernels: compiled, the tanh GELU's dozen elementwise operations (and their
    gradients) fused rather than each a pass over the activations."""
    return nn.gelu_approx(a) * b


def rms_norm(x, weight, eps):
    if _applies(x, weight, rows=_rows(x)):
        return kernels.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


# ----------------------------------------------------------------------------- attention

def rope(x_BNTH, theta, offset, scale=1.0, periods=None, traditional=True, dims=None):
    """RoPE over the first `dims` of each head (all by default). traditional: Meta's layout, which
    rotates interleaved pairs (x0, x1), (x2, x3), ...; else Hugging Face's, pairs (x_i, x_i+dims/2).
    Pair i turns by (offset + t) * scale / periods[i], or by (offset + t) * scale * theta^(-2i/dims)."""
    dims = dims or x_BNTH.shape[-1]
    if periods is None and _applies(x_BNTH, rows=x_BNTH.shape[2]):
        return kernels.rope(x_BNTH, dims, traditional, theta, scale, offset)
    return mx.fast.rope(x_BNTH, dims, traditional=traditional, base=None if periods is not None else theta,
                        scale=scale, offset=offset, freqs=periods)


@dataclass(frozen=True)
class Window:
    """An attention mask: causal (the queries the last T of the S keys), each query seeing only
    the last `size` keys up to its own (Mistral's and Gemma's windowed blocks)."""
    size: int


def dense_mask(mask, T, S):
    """A mask as mx.fast's attention takes it: None, "causal", or a boolean (T, S) array for a Window."""
    return _window_array(T, S, mask.size) if isinstance(mask, Window) else mask


@functools.lru_cache(maxsize=8)
def _window_array(T, S, size):
    """Made once per shape, not in every layer of every forward pass."""
    q_T1 = mx.arange(S - T, S)[:, None]
    k_1S = mx.arange(S)[None]
    return (k_1S <= q_T1) & (k_1S > q_T1 - size)


def attention(q_BNTH, k_BKSH, v_BKSH, scale, mask):
    """softmax(scale * q k^T + mask) v; grouped-query attention (K < N) included.
    mask: None (every query sees every key), "causal", or a Window."""
    if mask is None and _applies(q_BNTH, k_BKSH, v_BKSH, rows=q_BNTH.shape[2]):
        return kernels.attention(q_BNTH, k_BKSH, v_BKSH, scale)
    if mask is not None and _applies(q_BNTH, k_BKSH, v_BKSH):
        return _causal_attention(q_BNTH, k_BKSH, v_BKSH, scale, _window(mask))
    T, S = q_BNTH.shape[2], k_BKSH.shape[2]
    return mx.fast.scaled_dot_product_attention(q_BNTH, k_BKSH, v_BKSH, scale=scale, mask=dense_mask(mask, T, S))


def _window(mask):
    return mask.size if isinstance(mask, Window) else 0  # the kernel's 0: no window


def softcapped_attention(q_BNTH, k_BKSH, v_BKSH, scale, cap, mask):
    """softmax(cap tanh(scale q k^T / cap) + mask) v (Gemma 2's scores): the products in BLAS over
    each KV head's stacked query heads (as _causal_attention), the cap and the masked softmax one
    kernel pass each way where it applies."""
    B, N, T, H = q_BNTH.shape
    K, S = k_BKSH.shape[1:3]
    s_BKQS = q_BNTH.reshape(B, K, -1, H) @ k_BKSH.swapaxes(-1, -2)  # Q = N // K * T
    if mask is not None and _applies(s_BKQS):
        p_BKGTS = kernels.causal_softmax(s_BKQS.reshape(B, K, N // K, T, S), scale, _window(mask), cap)
    else:
        s_BKGTS = soft_cap(s_BKQS, cap, scale).reshape(B, K, N // K, T, S)
        if mask is not None:
            s_BKGTS = mx.where(dense_mask(Window(S) if mask == "causal" else mask, T, S), s_BKGTS, -mx.inf)
        p_BKGTS = mx.softmax(s_BKGTS.astype(mx.float32), axis=-1).astype(v_BKSH.dtype)
    return (p_BKGTS.reshape(B, K, -1, S) @ v_BKSH).reshape(B, N, T, H)


def soft_cap(x, cap, scale=1.0):
    """cap * tanh(scale * x / cap), Gemma 2's soft cap of scores and logits: one fused pass."""
    if _applies(x):
        return kernels.soft_cap(x, cap, scale)
    return _soft_cap(x, mx.array(scale / cap, x.dtype), mx.array(cap, x.dtype))


@functools.partial(mx.compile, shapeless=True)
def _soft_cap(x, inner, cap):
    return cap * mx.tanh(x * inner)


def _causal_attention(q_BNTH, k_BKSH, v_BKSH, scale, window=0):
    """Many queries (training, prompts): both products in BLAS, the masked softmax (causal,
    within `window` keys if > 0) one multi-threaded kernel each way."""
    B, N, T, H = q_BNTH.shape
    K, S = k_BKSH.shape[1:3]
    q_BKQH = q_BNTH.reshape(B, K, -1, H)  # Q = N // K * T: the query heads of one KV head, stacked
    s_BKQS = q_BKQH @ k_BKSH.swapaxes(-1, -2)
    p_BKQS = kernels.causal_softmax(s_BKQS.reshape(B, K, N // K, T, S), scale, window).reshape(B, K, -1, S)
    return (p_BKQS @ v_BKSH).reshape(B, N, T, H)
