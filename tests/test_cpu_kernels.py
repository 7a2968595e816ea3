"""cpu_kernels/ against float64 numpy and against the plain MLX path they replace.

Skipped when the kernels are not built (setup.sh builds them; a machine without a
C++ compiler runs plain MLX ops, which the rest of the suite covers).
"""

import collections

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

import models
import trainer
import loading
import ops
from formats import QUANT_BITS
from helpers import attention_float64, f64, gate_float64, rope_float64

kernels = ops.kernels
pytestmark = pytest.mark.skipif(kernels is None or mx.default_device() != mx.cpu,
                                reason="cpu_kernels not built (run setup.sh), or not on the CPU")


@pytest.mark.parametrize("rows,n,k", [(1, 64, 48), (3, 1027, 1000), (16, 33, 130)])
def test_matvec_matches_float64(rows, n, k):
    x, w = mx.random.normal((rows, k)), mx.random.normal((n, k))
    np.testing.assert_allclose(np.array(kernels.matvec(x, w)), f64(x) @ f64(w).T, atol=1e-4, rtol=1e-5)
    x3 = x.reshape(1, rows, k)  # leading axes are kept
    assert kernels.matvec(x3, w).shape == (1, rows, n)


@pytest.mark.parametrize("bits", QUANT_BITS)  # 3, 5 and 6 bits: values that cross words
@pytest.mark.parametrize("group_size,K", [(32, 256), (64, 256), (128, 256), (32, 96)])  # 96: words not 16s
def test_dequantize_and_quantized_matvec_match_mlx(bits, group_size, K):
    w = mx.random.normal((97, K))  # 97 rows: blocks of 4 (or 2) and 1 left
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    dense = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    # one fused multiply-add where MLX rounds twice: equal to the last bit or so
    np.testing.assert_allclose(np.array(kernels.dequantize(wq, scales, biases, group_size, bits)),
                               np.array(dense), atol=1e-6, rtol=1e-6)
    x = mx.random.normal((2, 3, K))
    np.testing.assert_allclose(np.array(kernels.quantized_matvec(x, wq, scales, biases, group_size, bits)),
                               f64(x) @ f64(dense).T, atol=1e-4, rtol=1e-5)
    # for the bfloat16 products: the same values rounded once to bfloat16 (to nearest even)
    as_bf16 = kernels.dequantize(wq, scales, biases, group_size, bits, mx.bfloat16)
    assert as_bf16.dtype == mx.bfloat16
    assert mx.array_equal(as_bf16, kernels.dequantize(wq, scales, biases, group_size, bits).astype(mx.bfloat16))
    if group_size == 32 and bits not in (3, 5):  # the same weights in groups of 16 (3 and 5 bits' packs
        # of 32 values do not fit them): the pack-by-pack loop, not the byte one
        halves = [mx.repeat(a, 2, axis=1) for a in (scales, biases)]
        np.testing.assert_allclose(np.array(kernels.quantized_matvec(x, wq, *halves, 16, bits)),
                                   f64(x) @ f64(dense).T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_quantized_linear_and_its_gradient_match_mlx(bits, kernel_calls):
    """At every width MLX quantizes to, ops.quantized_linear runs the kernels (a few rows: the
    quantized matvec; many: the dequantized weight in the frozen matmul), and its value and
    gradient are MLX's quantized matmul's."""
    wq, scales, biases = mx.quantize(mx.random.normal((75, 320)), group_size=64, bits=bits)
    # decoding: the quantized matvec, its gradient MLX's; many rows: dequantized in forward and in backward
    for rows, kernel, calls in [(3, "quantized_matvec", 1), (2 * ops.FEW_ROWS + 1, "dequantize", 2)]:
        x, cot = mx.random.normal((rows, 320)), mx.random.normal((rows, 75))
        (y,), (dx,) = mx.vjp(lambda x: ops.quantized_linear(x, wq, scales, biases, 64, bits), [x], [cot])
        (y_ref,), (dx_ref,) = mx.vjp(lambda x: mx.quantized_matmul(x, wq, scales, biases, group_size=64, bits=bits),
                                     [x], [cot])
        np.testing.assert_allclose(np.array(y), np.array(y_ref), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.array(dx), np.array(dx_ref), atol=1e-4, rtol=1e-5)
        assert kernel_calls[kernel] == calls, kernel


@pytest.mark.parametrize("dtype,rtol", [(mx.float32, 1e-5), (mx.float16, 1e-3)])  # float16: a float16 model generating
def test_matvecs_of_one_input_match_float64(dtype, rtol):
    """Several weights of one input in one loop, split between the threads across them;
    70 values a row: four vectors of 16 and a tail."""
    x, ws = mx.random.normal((2, 3, 70)), [mx.random.normal((n, 70)).astype(dtype) for n in (5, 70, 33)]
    for y, w in zip(kernels.matvecs(x, ws), ws):
        assert y.dtype == mx.float32
        np.testing.assert_allclose(np.array(y), f64(x) @ f64(w).T, atol=1e-4, rtol=1e-5)
    cots = [mx.random.normal((2, 3, w.shape[0])) for w in ws]

    def loss(x, *ws):
        return sum((y * c).sum() for y, c in zip(kernels.matvecs(x, list(ws)), cots))
    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(x, *ws)
    np.testing.assert_allclose(np.array(grads[0]), sum(f64(c) @ f64(w) for c, w in zip(cots, ws)), atol=1e-4)
    for g, c in zip(grads[1:], cots):
        assert g.dtype == dtype
        np.testing.assert_allclose(f64(g), f64(c).reshape(-1, g.shape[0]).T @ f64(x).reshape(-1, 70),
                                   atol=1e-4, rtol=rtol)


def test_float16_widens_exactly_on_every_thread():
    w = (100 * mx.random.normal((3, 5000))).astype(mx.float16)  # 15000 values: chunks for both threads, a tail
    wide = kernels.to_float32(w)
    assert wide.dtype == mx.float32 and (np.array(wide) == np.array(w).astype(np.float32)).all()
    cot = mx.random.normal((3, 5000))
    grad = mx.grad(lambda w: (kernels.to_float32(w) * cot).sum())(w)
    assert grad.dtype == mx.float16 and (np.array(grad) == np.array(cot.astype(mx.float16))).all()


def test_gradients_of_the_matvecs_flow_to_x():
    x, w = mx.random.normal((2, 64)), mx.random.normal((32, 64))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    cot = mx.random.normal((2, 32))
    grad = mx.grad(lambda x: (kernels.matvec(x, w) * cot).sum())(x)
    np.testing.assert_allclose(np.array(grad), f64(cot) @ f64(w), atol=1e-4)
    grad = mx.grad(lambda x: (kernels.quantized_matvec(x, wq, scales, biases, 64, 4) * cot).sum())(x)
    dense = f64(mx.dequantize(wq, scales, biases, group_size=64, bits=4))
    np.testing.assert_allclose(np.array(grad), f64(cot) @ dense, atol=1e-4)


def test_cross_entropy_and_its_gradient_match_float64():
    logits, targets = 3 * mx.random.normal((2, 5, 1003)), mx.random.randint(0, 1003, (2, 5))
    weights = mx.random.uniform(shape=(2, 5))
    L, t = f64(logits).reshape(10, -1), np.array(targets).reshape(-1)
    lse = np.log(np.exp(L - L.max(-1, keepdims=True)).sum(-1)) + L.max(-1)
    np.testing.assert_allclose(np.array(kernels.cross_entropy(logits, targets)).reshape(-1),
                               lse - L[np.arange(10), t], atol=2e-5)
    grad = mx.grad(lambda l: (kernels.cross_entropy(l, targets) * weights).sum())(logits)
    expected = np.exp(L - lse[:, None])
    expected[np.arange(10), t] -= 1
    expected *= f64(weights).reshape(10, 1)
    np.testing.assert_allclose(np.array(grad).reshape(10, -1), expected, atol=2e-6)


def test_cross_entropy_keeps_bad_values_visible():
    """The training loop skips steps whose loss is not finite: NaN must come through."""
    loss = kernels.cross_entropy(mx.array([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]]), mx.array([0, 7]))
    assert np.isnan(np.array(loss)).all()  # a NaN logit; a target outside the vocabulary


@pytest.mark.parametrize("gelu", [False, True])  # SwiGLU (silu), GeGLU (tanh GELU)
@pytest.mark.parametrize("shape", [(3, 7, 50), (3, 7, 1000)])  # one chunk; 6 chunks split between threads
def test_gates_and_their_gradients_match_float64(shape, gelu):
    a, b, cot = 4 * mx.random.normal(shape), mx.random.normal(shape), mx.random.normal(shape)
    A, B, C = f64(a), f64(b), f64(cot)
    act, slope = gate_float64(A, gelu)
    # float32 rounding of values up to ~10: relative as well as absolute
    np.testing.assert_allclose(np.array(kernels.gate(a, b, gelu)), act * B, rtol=1e-5, atol=1e-5)
    da, db = mx.grad(lambda a, b: (kernels.gate(a, b, gelu) * cot).sum(), argnums=(0, 1))(a, b)
    np.testing.assert_allclose(np.array(da), C * B * slope, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(db), C * act, rtol=1e-5, atol=1e-5)
    assert np.isnan(np.array(kernels.gate(mx.array([float("nan")]), mx.array([1.0]), gelu))).all()
    # GeGLU is the tanh GELU MLX and transformers compute, not its sigmoid approximation
    if gelu:
        np.testing.assert_allclose(np.array(kernels.gate(a, b, True)), np.array(nn.gelu_approx(a) * b), atol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 2 * 37), (3, 7, 2 * 1000)])  # rows cut between threads mid-row, or not
def test_gates_of_one_arrays_halves_match_float64(shape, gelu):
    """Phi-3's gate and up in one linear's output: the gate of its halves, and the gradient of both
    halves in one array."""
    ab, cot = 4 * mx.random.normal(shape), mx.random.normal(shape[:-1] + (shape[-1] // 2,))
    A, B = np.split(f64(ab), 2, axis=-1)
    act, slope = gate_float64(A, gelu)
    np.testing.assert_allclose(np.array(kernels.gate_halves(ab, gelu)), act * B, rtol=1e-5, atol=1e-5)
    grad = mx.grad(lambda ab: (kernels.gate_halves(ab, gelu) * cot).sum())(ab)
    C = f64(cot)
    np.testing.assert_allclose(np.array(grad), np.concatenate([C * B * slope, C * act], axis=-1), rtol=1e-5, atol=1e-5)


def test_gelu_and_soft_cap_and_their_gradients_match_float64():
    """GPT-2's ungated tanh GELU and Gemma 2's soft cap of the logits, values and gradients."""
    a, cot = 4 * mx.random.normal((3, 37, 41)), mx.random.normal((3, 37, 41))  # odd sizes: the scalar tails too
    A, C = f64(a), f64(cot)
    G = 0.5 * A * (1 + np.tanh(np.sqrt(2 / np.pi) * (A + 0.044715 * A ** 3)))
    np.testing.assert_allclose(np.array(kernels.gelu(a)), G, atol=1e-5)
    grad = mx.grad(lambda a: (kernels.gelu(a) * cot).sum())(a)
    expected = mx.grad(lambda a: (nn.gelu_approx(a.astype(mx.float32)) * cot).sum())(a)
    np.testing.assert_allclose(np.array(grad), np.array(expected), atol=1e-5)
    T = np.tanh(0.5 * A / 3.0)  # cap 3, scale 0.5
    np.testing.assert_allclose(np.array(kernels.soft_cap(a, 3.0, 0.5)), 3.0 * T, atol=1e-6)
    grad = mx.grad(lambda a: (kernels.soft_cap(a, 3.0, 0.5) * cot).sum())(a)
    np.testing.assert_allclose(np.array(grad), C * 0.5 * (1 - T ** 2), atol=1e-6)


@pytest.mark.parametrize("cap", [0.0, 2.0])  # none; Gemma 2's soft cap of the scores, tight enough to bite
@pytest.mark.parametrize("window", [0, 1, 7])  # none; each query itself alone; a window of 7 keys
@pytest.mark.parametrize("T,S", [(5, 9), (40, 40), (3, 100)])  # queries the last T of S positions; square; rows past 64 keys
def test_causal_softmax_and_its_gradient_match_float64(T, S, window, cap):
    x, cot = 3 * mx.random.normal((2, 3, T, S)), mx.random.normal((2, 3, T, S))
    X, C = 0.7 * f64(x), f64(cot)
    slope = 1.0  # d(capped score) / d(0.7 x)
    if cap:
        X, slope = cap * np.tanh(X / cap), 1 - np.tanh(X / cap) ** 2
    last = np.arange(T)[:, None] + S - T  # [T, 1]: the last key each query sees
    seen = (np.arange(S)[None] <= last) & ((np.arange(S)[None] > last - window) if window else True)  # [T, S]
    e = np.where(seen, np.exp(np.where(seen, X, -np.inf) - np.where(seen, X, -np.inf).max(-1, keepdims=True)), 0.0)
    P = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(kernels.causal_softmax(x, 0.7, window, cap)), P, atol=1e-6)
    grad = mx.grad(lambda x: (kernels.causal_softmax(x, 0.7, window, cap) * cot).sum())(x)
    np.testing.assert_allclose(np.array(grad), 0.7 * slope * P * (C - (P * C).sum(-1, keepdims=True)), atol=1e-6)


def test_causal_attention_and_its_gradient_match_mlx():
    """The model's attention of many queries (BLAS products around the softmax kernel)
    against mx.fast's, grouped-query heads included."""
    q, k, v = mx.random.normal((2, 4, 24, 8)), mx.random.normal((2, 2, 24, 8)), mx.random.normal((2, 2, 24, 8))
    cot = mx.random.normal((2, 4, 24, 8))
    grads = [mx.value_and_grad(lambda q, k, v: (fn(q, k, v) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
             for fn in (lambda q, k, v: ops.attention(q, k, v, 0.3, "causal"),
                        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal"))]
    (value, got), (ref_value, ref) = grads
    assert abs(value.item() - ref_value.item()) < 1e-4
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=1e-5)


def test_rms_norm_and_its_gradient_match_mlx():
    x, w, cot = mx.random.normal((2, 3, 96)), mx.random.normal((96,)), mx.random.normal((2, 3, 96))
    X = f64(x)
    expected = X / np.sqrt((X ** 2).mean(-1, keepdims=True) + 1e-5) * f64(w)
    np.testing.assert_allclose(np.array(kernels.rms_norm(x, w, 1e-5)), expected, atol=1e-5)
    grads = [mx.grad(lambda x, w: (norm(x, w, 1e-5) * cot).sum(), argnums=(0, 1))(x, w)
             for norm in (kernels.rms_norm, mx.fast.rms_norm)]
    for got, ref in zip(*grads):
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5)


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims,offset", [(32, 0), (32, 3000), (16, 7)])  # 16: half the head turns
def test_rope_matches_float64(traditional, dims, offset):
    """Angles in double: at position 3000 MLX's float32 angles are off by about 3e-4."""
    x = mx.random.normal((2, 3, 4, 32))
    np.testing.assert_allclose(np.array(kernels.rope(x, dims, traditional, 10000.0, 1.0, offset)),
                               rope_float64(x, dims, traditional, 10000.0, offset), atol=2e-6)


def test_rope_gradient_matches_mlx():
    x, cot = mx.random.normal((1, 4, 2, 32)), mx.random.normal((1, 4, 2, 32))
    grads = [mx.grad(lambda x: (fn(x) * cot).sum())(x)
             for fn in (lambda x: kernels.rope(x, 32, True, 10000.0, 1.0, 5),
                        lambda x: mx.fast.rope(x, 32, traditional=True, base=10000.0, scale=1.0, offset=5))]
    np.testing.assert_allclose(np.array(grads[0]), np.array(grads[1]), atol=1e-5)


@pytest.mark.parametrize("S,H", [(40, 16), (600, 16), (40, 88)])  # 600: split between the threads; 88: 64 + 16 + 8
def test_attention_over_cache_slices_matches_float64(S, H):
    """Grouped-query attention (4 query heads on 2 key-value heads) over keys and values
    that are slices of a longer buffer, as the KV cache hands them over."""
    q = mx.random.normal((2, 4, 3, H))
    k_buf, v_buf = mx.random.normal((2, 2, S + 50, H)), mx.random.normal((2, 2, S + 50, H))
    k, v = k_buf[:, :, 10:10 + S], v_buf[:, :, 10:10 + S]
    scale = H ** -0.5
    np.testing.assert_allclose(np.array(kernels.attention(q, k, v, scale)), attention_float64(q, k, v, scale),
                               atol=1e-5)
    k_t = mx.random.normal((2, 2, H, S)).swapaxes(2, 3)  # strided along the head axis too
    np.testing.assert_allclose(np.array(kernels.attention(q, k_t, v, scale)),
                               np.array(mx.fast.scaled_dot_product_attention(q, k_t, v, scale=scale)), atol=1e-5)


def test_attention_gradient_matches_mlx():
    q, k, v = mx.random.normal((1, 4, 2, 8)), mx.random.normal((1, 2, 9, 8)), mx.random.normal((1, 2, 9, 8))
    cot = mx.random.normal((1, 4, 2, 8))
    grads = [mx.grad(lambda q, k, v: (fn(q, k, v, scale=0.3) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
             for fn in (lambda q, k, v, scale: kernels.attention(q, k, v, scale),
                        mx.fast.scaled_dot_product_attention)]
    for got, ref in zip(*grads):
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5)


def test_strided_views_are_read_as_their_values():
    """Inputs reach the kernels as they are; a view that is not row-contiguous (a
    transpose, a strided slice, a broadcast) is packed when the kernel runs."""
    x, w = mx.random.normal((48, 3)), mx.random.normal((5, 48))
    np.testing.assert_allclose(np.array(kernels.matvec(x.T, w)), f64(x).T @ f64(w).T, atol=1e-4)
    a, b = mx.random.normal((6, 4)), mx.random.normal((4,))
    np.testing.assert_allclose(np.array(kernels.gate(a.T, mx.broadcast_to(b[:, None], (4, 6)), False)),
                               np.array(kernels.gate(mx.array(np.array(a.T)), mx.repeat(b[:, None], 6, 1), False)))
    q = mx.random.normal((1, 3, 4, 16))  # [B, T, N, H] -> [B, N, T, H], as the model does
    np.testing.assert_allclose(np.array(kernels.rope(q.transpose(0, 2, 1, 3), 16, True, 10000.0, 1.0, 2)),
                               rope_float64(q.transpose(0, 2, 1, 3), 16, True, 10000.0, 2), atol=2e-6)
    logits, targets = mx.random.normal((4, 20)), mx.array([1, 2, 3, 4])
    np.testing.assert_allclose(np.array(kernels.cross_entropy(logits[:, ::2], targets)),
                               np.array(nn.losses.cross_entropy(logits[:, ::2], targets)), atol=1e-5)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    with pytest.raises(ValueError):
        kernels.matvec(mx.zeros((1, 5)), mx.zeros((4, 6)))
    with pytest.raises(ValueError):
        kernels.matvec(mx.zeros((1, 4), mx.float16), mx.zeros((4, 4), mx.float16))  # x must be float32
    with pytest.raises(ValueError):
        kernels.matvecs(mx.zeros((1, 4)), [mx.zeros((4, 4)), mx.zeros((4, 4), mx.float16)])
    with pytest.raises(ValueError):
        kernels.to_float32(mx.zeros((4,)))
    wq, scales, biases = mx.quantize(mx.zeros((8, 64)), group_size=64, bits=4)
    with pytest.raises(ValueError):
        kernels.dequantize(wq, scales, biases, 32, 4)  # scales made for groups of 64
    with pytest.raises(ValueError):
        # 96 values in 2 groups of 48: groups must be powers of two
        kernels.dequantize(mx.zeros((8, 12), mx.uint32), mx.zeros((8, 2)), mx.zeros((8, 2)), 48, 4)
    # 64 5-bit values in 4 groups of 16: a pack of 32 values crosses them; 12 words of 5 bits:
    # 76.8 values; no 7-bit layout
    for words, group_size, bits, groups, why in [(10, 16, 5, 4, "group_size"), (12, 32, 5, 2, "packs"),
                                                 (14, 32, 7, 2, "bits")]:
        with pytest.raises(ValueError, match=why):
            kernels.dequantize(mx.zeros((8, words), mx.uint32), mx.zeros((8, groups)), mx.zeros((8, groups)),
                               group_size, bits)
    with pytest.raises(ValueError):
        kernels.rope(mx.zeros((1, 2, 1, 8)), 7, True, 10000.0, 1.0, 0)  # odd number of dims
    with pytest.raises(ValueError):
        kernels.attention(mx.zeros((1, 3, 1, 8)), mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 5, 8)), 1.0)
    with pytest.raises(ValueError):
        kernels.rms_norm(mx.zeros((1, 8)), mx.zeros((7,)), 1e-5)
    with pytest.raises(ValueError):
        kernels.causal_softmax(mx.zeros((1, 6, 5)), 1.0)  # more queries than keys
    with pytest.raises(ValueError):
        kernels.causal_softmax(mx.zeros((1, 5, 5)), 1.0, 0, float("nan"))  # a cap must be a number >= 0
    with pytest.raises(ValueError):
        kernels.soft_cap(mx.zeros((2, 3)), 0.0)  # no cap
    with pytest.raises(ValueError):
        kernels.gate_halves(mx.zeros((2, 7)), False)  # no halves of an odd width


# --------------------------------------------------------------------------- in the model

ARGS = models.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                        vocab_size=320, norm_eps=1e-5)


def random_model(weights="float32"):
    """float32, bits (an int), or float16: stored so, kept so for generation (set_compute_dtype)."""
    mx.random.seed(3)
    model = models.Model(ARGS)
    if isinstance(weights, int):
        nn.quantize(model, 64, weights)
    elif weights == "float16":
        loading.cast_floats(model, mx.float16)
        loading.set_compute_dtype(model, generation_only=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the kernel calls the model code makes (else a path that silently stopped
    using the kernels would still match plain MLX)."""
    calls = collections.Counter()

    class Counting:
        def __getattr__(self, name):
            def call(*args):
                calls[name] += 1
                return getattr(kernels, name)(*args)
            return call

    monkeypatch.setattr(ops, "kernels", Counting())
    return calls


@pytest.fixture
def plain_mlx(monkeypatch):
    """Run the model code with the kernels off, as on a machine without them."""
    def off():
        monkeypatch.setattr(ops, "kernels", None)
    return off


@pytest.mark.parametrize("weights", ["float32", "float16", 4, 5, 8])
def test_model_logits_with_and_without_kernels(weights, kernel_calls, plain_mlx):
    """Prompt (many rows) and decoding (one row) both take the kernel paths; the norm,
    RoPE and attention kernels serve decoding only, the causal softmax the prompt."""
    model = random_model(weights)
    tokens = mx.array([[1, 5, 9, 200, 17, 3, 44, 12, 8, 60, 2, 7, 90, 31, 5, 6, 77, 19]])  # 18 > MATVEC_ROWS

    def run():
        cache = model.make_cache()
        return model(tokens, cache), model(mx.array([[11]]), cache)

    with_kernels = run()
    n_linear = 7 * ARGS.n_layers + 1
    if isinstance(weights, int):  # prompt: dequantize into BLAS; decoding: quantized matvec
        assert kernel_calls["dequantize"] == kernel_calls["quantized_matvec"] == n_linear
    else:  # decoding: matvecs for q, k, v and w1, w3, matvec for the rest
        assert kernel_calls["matvecs"] == 2 * ARGS.n_layers and kernel_calls["matvec"] == n_linear - 5 * ARGS.n_layers
        # prompt: MLX's matmul, float16 weights widened first
        assert kernel_calls["to_float32"] == (n_linear if weights == "float16" else 0)
    assert kernel_calls["gate"] == 2 * ARGS.n_layers
    # decoding only: norms (two a layer and the last), RoPE of queries and keys, attention
    assert kernel_calls["rms_norm"] == 2 * ARGS.n_layers + 1
    assert kernel_calls["rope"] == 2 * ARGS.n_layers and kernel_calls["attention"] == ARGS.n_layers
    assert kernel_calls["causal_softmax"] == ARGS.n_layers
    plain_mlx()
    for got, ref in zip(with_kernels, run()):
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-4, rtol=1e-4)


def test_qlora_gradients_with_and_without_kernels(kernel_calls, plain_mlx):
    """QLoRA's dequantize-into-BLAS path trains the same adapters as MLX's quantized matmul."""
    def grads():
        model = random_model(4)
        models.apply_lora(model, models.AdapterConfig(layers=2, targets=models.parse_targets("all")))
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))  # B != 0
        tokens = mx.random.randint(0, 320, (2, 17), key=mx.random.key(0))
        batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((2, 16)))
        (loss, _), g = nn.value_and_grad(model, trainer.loss_fn)(model, *batch)
        return loss, tree_flatten(g)

    loss, with_kernels = grads()
    assert kernel_calls["cross_entropy"] == 1 and kernel_calls["dequantize"] > 0
    assert kernel_calls["causal_softmax"] == ARGS.n_layers
    plain_mlx()
    ref_loss, ref = grads()
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    for (name, got), (_, expected) in zip(with_kernels, ref):
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5, rtol=1e-3, err_msg=name)


def test_qlora_step_holds_one_dense_layer_at_a_time():
    """The dequantized weights of QLoRA's products are made when their layer runs:
    in the compiled training step, peak memory grows with depth by the quantized
    layers, not by dense copies (MLX, free to order the graph, once made them all
    first: about 3 MB a layer here, 28 GB for a 7B model)."""
    def peak(n_layers):
        mx.random.seed(0)
        args = models.ModelArgs(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
                                vocab_size=320, norm_eps=1e-5)
        model = models.Model(args)
        nn.quantize(model, 64, 4)
        models.apply_lora(model, models.AdapterConfig(layers=n_layers, targets=models.parse_targets("wq,wv")))
        optimizer = optim.Adam(learning_rate=1e-5)
        step = trainer.make_train_step(model, optimizer)
        tokens = mx.random.randint(0, 320, (1, 33), key=mx.random.key(0))
        batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((1, 32)))
        mx.eval(step(*batch), model.trainable_parameters(), optimizer.state)
        mx.reset_peak_memory()
        mx.eval(step(*batch), model.trainable_parameters(), optimizer.state)
        return mx.get_peak_memory()

    dense_layer = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)  # bytes of one layer's float32 weights
    quantized_layer = dense_layer // 8 * 5 // 4  # 4 bits a weight, and a scale and bias per 64
    shallow, deep = peak(2), peak(6)
    # the four more layers' quantized weights must show, or the peak is not measured at all
    assert deep - shallow > 4 * quantized_layer
    assert (deep - shallow) / 4 < dense_layer / 2


# --------------------------------------------------------------------------- bfloat16 products (AMX)

needs_amx = pytest.mark.skipif(kernels is None or not kernels.bf16_products(),
                               reason="no AMX bfloat16 tiles on this CPU (or kernel)")


def bf16_rounded(a):
    """a's values rounded to bfloat16 (to nearest, ties to even), as float64."""
    return f64(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def bf16_product_bound(a, b_KN):
    """How far float32 sums of the exact products of bfloat16 values may stray from float64:
    K roundings of 2^-24 each, over the sum of the products' magnitudes."""
    a_r, b_r = bf16_rounded(a), bf16_rounded(b_KN)
    return a_r @ b_r, a.shape[-1] * 2.0**-24 * (np.abs(a_r) @ np.abs(b_r)) + 1e-30


@needs_amx
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 7, 3), (33, 47, 65), (64, 96, 128), (100, 200, 1100), (70, 33, 2100)])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("stored", [mx.float32, mx.float16, mx.bfloat16])
def test_bf16_matmul_is_the_float32_sum_of_bfloat16_products(m, n, k, transposed, stored):
    """Every edge of the 32x32 blocks and 32-value steps, K past one chunk of 1024, both
    orientations of B, B stored as float32 or float16 (rounded when packed) or bfloat16."""
    a = mx.random.normal((m, k), key=mx.random.key(m))
    b_NK = mx.random.normal((n, k), key=mx.random.key(n)).astype(stored)
    b = b_NK if transposed else mx.contiguous(b_NK.T)
    got = f64(kernels.bf16_matmul(a, b, transposed))
    exact, bound = bf16_product_bound(a, f64(b_NK.astype(mx.float32)).T)
    assert (np.abs(got - exact) <= bound).all()
    if k > 16:  # the rounding to bfloat16 shows: not a float32 product
        assert np.abs(got - f64(a) @ f64(b_NK.astype(mx.float32)).T).max() > 1e3 * bound.max() / k


@needs_amx
def test_bf16_matmul_keeps_leading_axes_and_reads_views_as_their_values():
    a = mx.random.normal((2, 3, 40, 64))
    w = mx.random.normal((64, 50))  # its transpose, a view, is the [N, K] weight
    got = kernels.bf16_matmul(a, w.T, True)
    assert got.shape == (2, 3, 40, 50)
    exact, bound = bf16_product_bound(a.reshape(-1, 64), f64(w))
    assert (np.abs(f64(got).reshape(-1, 50) - exact) <= bound).all()
    assert f64(kernels.bf16_matmul(mx.zeros((4, 0)), mx.zeros((0, 3)), False)).tolist() == [[0.0] * 3] * 4


@needs_amx
@pytest.mark.parametrize("transposed", [True, False])
def test_bf16_matmul_gradients(transposed):
    """d/da through the kernel in the other orientation (bfloat16 products of the cotangent);
    d/db in float32."""
    a, g = mx.random.normal((37, 70)), mx.random.normal((37, 45))
    w_NK = mx.random.normal((45, 70))
    b = w_NK if transposed else mx.contiguous(w_NK.T)
    _, (da, db) = mx.vjp(lambda a, b: kernels.bf16_matmul(a, b, transposed), [a, b], [g])
    exact, bound = bf16_product_bound(g, f64(w_NK))
    assert (np.abs(f64(da) - exact) <= bound).all()
    db_NK = f64(g).T @ f64(a)
    np.testing.assert_allclose(f64(db), db_NK if transposed else db_NK.T, rtol=1e-4, atol=1e-4)


def test_bad_arguments_of_bf16_matmul_raise():
    for a, b in [(mx.zeros((2, 4), mx.float16), mx.zeros((3, 4))), (mx.zeros((2, 4)), mx.zeros((3, 4), mx.int32)),
                 (mx.zeros((2, 4)), mx.zeros((3, 5))), (mx.zeros((2, 4)), mx.zeros((1, 3, 4)))]:
        with pytest.raises(ValueError):
            kernels.bf16_matmul(a, b, True)


@pytest.fixture
def bfloat16_products():
    ops.use_bfloat16_products()
    yield
    ops.use_bfloat16_products(False)


@needs_amx
@pytest.mark.parametrize("weights", ["float32", 4, 5])
def test_bfloat16_products_in_the_model(weights, kernel_calls, bfloat16_products):
    """Every frozen product of a prompt and of a LoRA step's backward runs on AMX; logits and
    adapter gradients stay within bfloat16's rounding of the float32 ones."""
    def run():
        model = random_model(weights)
        tokens = mx.random.randint(0, 320, (2, 33), key=mx.random.key(0))
        logits = model(tokens[:, :-1])
        models.apply_lora(model, models.AdapterConfig(layers=2, targets=models.parse_targets("all")))
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))  # B != 0
        batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((2, 32)))
        (loss, _), g = nn.value_and_grad(model, trainer.loss_fn)(model, *batch)
        return logits, loss, tree_flatten(g)

    logits, loss, grads = run()
    n_linear = 7 * ARGS.n_layers + 1
    # forward twice (the logits, then the loss), each frozen linear; a quantized one's backward
    # calls it from Python too (a float one's, from the primitive's vjp: tested above), but for
    # the first block's q, k and v, whose input's gradient would reach only the frozen embedding
    backward = n_linear - 3 if isinstance(weights, int) else 0
    assert kernel_calls["bf16_matmul"] == 2 * n_linear + backward
    ops.use_bfloat16_products(False)
    ref_logits, ref_loss, ref_grads = run()
    scale = np.abs(np.array(ref_logits)).max()
    assert np.abs(np.array(logits) - np.array(ref_logits)).max() < 2e-2 * scale
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    for (name, got), (_, expected) in zip(grads, ref_grads):
        cosine = (f64(got) * f64(expected)).sum() / np.linalg.norm(f64(got)) / np.linalg.norm(f64(expected))
        assert cosine > 0.99, name


def test_compute_dtype_bfloat16_on_a_cpu_without_amx_is_refused(monkeypatch):
    monkeypatch.setattr(ops, "bfloat16_products_available", lambda: False)
    with pytest.raises(loading.UserError, match="AMX"):
        loading.set_compute_dtype(random_model(), "bfloat16")


@needs_amx
def test_bfloat16_products_read_a_float16_model_kept_for_generation(kernel_calls, bfloat16_products):
    """lora.py --prompt --compute-dtype bfloat16 on a float16 model: its weights stay float16 and
    the prompt's products round them to bfloat16 as they pack."""
    model = random_model("float16")  # loading's compute dtype, auto: products back in float32
    ops.use_bfloat16_products()  # then asked for again, as lora.py --compute-dtype bfloat16 does
    tokens = mx.random.randint(0, 320, (1, 40), key=mx.random.key(1))
    logits = np.array(model(tokens))
    assert kernel_calls["bf16_matmul"] == 7 * ARGS.n_layers + 1
    assert model.layers[0].attention.wq.weight.dtype == mx.float16  # kept, not widened
    ops.use_bfloat16_products(False)
    ref = np.array(model(tokens))
    assert np.abs(logits - ref).max() < 2e-2 * np.abs(ref).max()


@needs_amx
def test_each_model_loaded_sets_the_precision_of_its_products():
    """One process, two models: the second, loaded for float32, must not inherit bfloat16 products."""
    loading.set_compute_dtype(random_model(), "bfloat16")
    assert ops.bfloat16_products_used()
    loading.set_compute_dtype(random_model(), "auto")
    assert not ops.bfloat16_products_used()


def test_a_kernels_build_of_other_sources_is_not_used(monkeypatch, capsys):
    """A _cpu_kernels left from older sources (a git pull without setup.sh) would be called with
    arguments it does not take: plain MLX runs instead, and the user is told."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "_cpu_kernels", types.SimpleNamespace(API_VERSION=1, __file__="old.so"))
    assert ops._load_kernels() is None
    assert "rerun setup.sh" in capsys.readouterr().err
