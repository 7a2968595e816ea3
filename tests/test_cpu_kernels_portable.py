"""cpu_kernels/ built without AVX-512 (_cpu_kernels_portable), against float64 numpy
and against the native build.

On an AVX-512 machine the native build (setup.sh, -march=native) never compiles the
portable branches (`#else` of `#if defined(__AVX512F__)`, the scalar loops that then
do all the work). This module builds them with -DMLX_LORA_PORTABLE=ON into a temporary
folder and runs every operation on shapes with tails (sizes that are not multiples of
16). Skipped without Linux x86-64, CMake, a C++ compiler or nanobind; a build that
configures but does not compile fails.
"""

import importlib
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
from formats import QUANT_BITS
from helpers import attention_float64, f64, gate_float64, rope_float64


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = os.path.join(ROOT, "cpu_kernels")


def run_logged(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    return result.returncode, (result.stdout + result.stderr)[-6000:]


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The kernels built without AVX-512 (x86-64-v2), imported from a pytest tmp folder."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the portable build is for Linux x86-64")
    if shutil.which("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    try:
        import nanobind  # noqa: F401
    except ImportError:
        pytest.skip("needs nanobind (setup.sh installs it)")
    root = tmp_path_factory.mktemp("cpu_kernels_portable")
    build, out = root / "build", root / "out"
    rc, log = run_logged(["cmake", "-S", SOURCES, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                          "-DMLX_LORA_PORTABLE=ON", f"-DMLX_LORA_OUTPUT_DIR={out}"])
    if rc != 0:  # the environment (no Python headers, no MLX): not the kernels' fault
        pytest.skip(f"cmake could not configure the portable build:\n{log}")
    rc, log = run_logged(["cmake", "--build", str(build), "--parallel", str(min(2, os.cpu_count() or 1))])
    assert rc == 0, f"the portable kernels do not compile:\n{log}"
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("_cpu_kernels_portable")
    finally:
        sys.path.remove(str(out))
    assert os.path.dirname(module.__file__) == str(out)
    return module


@pytest.fixture(scope="module")
def native():
    """The native build in the repository root (setup.sh), or None."""
    try:
        return importlib.import_module("_cpu_kernels")
    except ImportError:
        return None


def test_the_native_build_is_there_to_compare_against(portable, native):
    """The tests below compare the two builds: they must be two (not the portable one twice, or
    the native one loaded under the other's name), and a disagreement between them must fail."""
    if native is None:
        pytest.skip("_cpu_kernels not built (run setup.sh): the portable one is checked against float64 only")
    assert native is not portable and os.path.dirname(native.__file__) == ROOT
    x, w = mx.random.normal((2, 40)), mx.random.normal((7, 40))
    got, ref = both(portable, native, lambda kernels: kernels.matvec(x, w))
    close(got, f64(x) @ f64(w).T, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        close(got, f64(x) @ f64(w).T, ref * 1.001, rtol=1e-5, atol=1e-5)


def close(got, expected, native_got=None, **tolerance):
    """got against float64, and against the native build's result when there is one."""
    np.testing.assert_allclose(np.array(got), expected, **tolerance)
    if native_got is not None:
        np.testing.assert_allclose(np.array(got), np.array(native_got), **tolerance)


def both(portable, native, fn):
    """fn(kernels) for the portable build, and for the native one (None without it)."""
    return fn(portable), (fn(native) if native is not None else None)


# --------------------------------------------------------------------------- float weights

@pytest.mark.parametrize("rows,n,k", [(1, 67, 45), (3, 1029, 1001), (5, 33, 130)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_matvec(portable, native, rows, n, k, dtype):
    x, w = mx.random.normal((rows, k)), mx.random.normal((n, k)).astype(dtype)
    got, ref = both(portable, native, lambda kernels: kernels.matvec(x, w))
    assert got.dtype == mx.float32 and got.shape == (rows, n)
    close(got, f64(x) @ f64(w).T, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_matvecs_of_one_input(portable, native, dtype):
    """Several weights in one loop over their row blocks: 5, 71 and 33 rows (blocks of 4
    and what is left), 75 values a row."""
    x, ws = mx.random.normal((2, 3, 75)), [mx.random.normal((n, 75)).astype(dtype) for n in (5, 71, 33)]
    got, ref = both(portable, native, lambda kernels: kernels.matvecs(x, ws))
    for i, w in enumerate(ws):
        assert got[i].shape == (2, 3, w.shape[0])
        close(got[i], f64(x) @ f64(w).T, None if ref is None else ref[i], atol=1e-4, rtol=1e-5)


def test_to_float32(portable, native):
    w = (100 * mx.random.normal((3, 5001))).astype(mx.float16)  # 15003 values: chunks for every thread, a tail
    got, ref = both(portable, native, lambda kernels: kernels.to_float32(w))
    assert got.dtype == mx.float32 and (np.array(got) == np.array(w).astype(np.float32)).all()
    if ref is not None:
        assert (np.array(got) == np.array(ref)).all()


# --------------------------------------------------------------------------- quantized weights

def random_quantized(N, K, group_size, bits, seed):
    """Every bit pattern in the words, scales and biases that vary by group, and the
    float64 matrix they stand for by the definition of MLX's affine layout: each row a
    little-endian bit stream, value k in bits [bits * k, bits * (k + 1)), w = scale * q +
    bias per group."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2 ** 32, (N, K * bits // 32), dtype=np.uint64).astype(np.uint32)
    top = 2 ** bits - 1
    scales = (rng.uniform(0.5, 1.5, (N, K // group_size)) * 4 / top).astype(np.float32)
    biases = (-scales * top / 2 + rng.normal(0, 0.1, scales.shape)).astype(np.float32)
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")  # [N, K * bits]
    q = (stream.reshape(N, K, bits).astype(np.float64) * 2.0 ** np.arange(bits)).sum(-1)
    dense = (np.repeat(scales, group_size, axis=1).astype(np.float64) * q
             + np.repeat(biases, group_size, axis=1).astype(np.float64))
    return mx.array(words), mx.array(scales), mx.array(biases), dense


@pytest.mark.parametrize("bits,group_size,K", [
    (bits, group_size, K) for bits in QUANT_BITS
    for group_size, K in [(16, 208), (32, 96), (32, 384), (64, 384), (128, 384)]
    if group_size % 32 == 0 or bits not in (3, 5)])  # 3 and 5 bits pack 32 values: no groups of 16
def test_dequantize_and_quantized_matvec(portable, native, bits, group_size, K):
    """Groups of 16 take the pack-by-pack loop even with AVX-512; 96 values: 3 words of 8
    bits, not whole 16s; 101 rows: blocks of 4 (or 2) and 1 left."""
    wq, scales, biases, dense = random_quantized(101, K, group_size, bits, seed=bits * K + group_size)
    got, ref = both(portable, native, lambda kernels: kernels.dequantize(wq, scales, biases, group_size, bits))
    close(got, dense, ref, atol=1e-6, rtol=1e-6)  # a fused multiply-add or two roundings
    if group_size >= 32:  # the layout of the float64 reference is MLX's
        np.testing.assert_allclose(np.array(got), np.array(mx.dequantize(wq, scales, biases, group_size=group_size,
                                                                         bits=bits)), atol=1e-6, rtol=1e-6)
    # bfloat16: the float32 values rounded once (to nearest even)
    as_bf16 = portable.dequantize(wq, scales, biases, group_size, bits, mx.bfloat16)
    assert as_bf16.dtype == mx.bfloat16 and mx.array_equal(as_bf16, got.astype(mx.bfloat16))
    for shape in [(K,), (2, 3, K), (7, K)]:
        x = mx.random.normal(shape)
        got, ref = both(portable, native,
                        lambda kernels: kernels.quantized_matvec(x, wq, scales, biases, group_size, bits))
        assert got.shape == shape[:-1] + (101,)
        close(got, f64(x) @ dense.T, ref, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- the loss, the gate, the softmax

def test_cross_entropy_and_its_gradient(portable, native):
    """Rows of logits near 0, near 100 and near -100: past exp's float32 range (about
    +-88) unless the row's maximum is taken out first, so that a wrong maximum shows."""
    logits = 3 * mx.random.normal((3, 5, 1003)) + mx.array([0.0, 100.0, -100.0])[:, None, None]
    targets, weights = mx.random.randint(0, 1003, (3, 5)), mx.random.uniform(shape=(3, 5))
    L, t, rows = f64(logits).reshape(15, -1), np.array(targets).reshape(-1), np.arange(15)
    lse = np.log(np.exp(L - L.max(-1, keepdims=True)).sum(-1)) + L.max(-1)
    got, ref = both(portable, native, lambda kernels: kernels.cross_entropy(logits, targets))
    close(np.array(got).reshape(-1), lse - L[rows, t], None if ref is None else np.array(ref).reshape(-1), atol=5e-5)
    expected = np.exp(L - lse[:, None])
    expected[rows, t] -= 1
    expected *= f64(weights).reshape(15, 1)
    got, ref = both(portable, native,
                    lambda kernels: mx.grad(lambda l: (kernels.cross_entropy(l, targets) * weights).sum())(logits))
    # rtol: the log-sum-exp near 100 is rounded to float32's 4e-6, and exp turns that into a relative error
    close(np.array(got).reshape(15, -1), expected, None if ref is None else np.array(ref).reshape(15, -1),
          atol=2e-6, rtol=5e-5)


def test_cross_entropy_keeps_bad_values_visible(portable):
    loss = portable.cross_entropy(mx.array([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]]), mx.array([0, 7]))
    assert np.isnan(np.array(loss)).all()  # a NaN logit; a target outside the vocabulary


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 51), (3, 7, 1001)])  # one chunk; several, split between threads
def test_gates_and_their_gradients(portable, native, shape, gelu):
    a, b, cot = 4 * mx.random.normal(shape), mx.random.normal(shape), mx.random.normal(shape)
    A, B, C = f64(a), f64(b), f64(cot)
    act, slope = gate_float64(A, gelu)
    got, ref = both(portable, native, lambda kernels: kernels.gate(a, b, gelu))
    close(got, act * B, ref, rtol=1e-5, atol=1e-5)  # float32 rounding of values up to ~40: relative too
    got, ref = both(portable, native,
                    lambda kernels: mx.grad(lambda a, b: (kernels.gate(a, b, gelu) * cot).sum(), argnums=(0, 1))(a, b))
    close(got[0], C * B * slope, None if ref is None else ref[0], rtol=1e-5, atol=1e-5)
    close(got[1], C * act, None if ref is None else ref[1], rtol=1e-5, atol=1e-5)
    assert np.isnan(np.array(portable.gate(mx.array([float("nan")]), mx.array([1.0]), gelu))).all()


@pytest.mark.parametrize("T,S", [(5, 9), (40, 40), (3, 100), (17, 301)])
def test_causal_softmax_and_its_gradient(portable, native, T, S):
    """Queries the last T of S positions; scaled scores near 0, 100 and -100 in the
    three heads (past exp's float32 range unless each row's maximum is taken out first)."""
    x = 3 * mx.random.normal((2, 3, T, S)) + mx.array([0.0, 150.0, -150.0])[:, None, None]
    cot = mx.random.normal((2, 3, T, S))
    X, C = 0.7 * f64(x), f64(cot)
    seen = np.arange(S)[None] <= np.arange(T)[:, None] + S - T  # [T, S]
    Xm = np.where(seen, X, -np.inf)
    e = np.exp(Xm - Xm.max(-1, keepdims=True))
    P = e / e.sum(-1, keepdims=True)
    # rtol: 0.7 * x near 100 is rounded to float32's 4e-6, and exp turns that into a relative error
    got, ref = both(portable, native, lambda kernels: kernels.causal_softmax(x, 0.7))
    close(got, P, ref, atol=1e-6, rtol=1e-5)
    got, ref = both(portable, native,
                    lambda kernels: mx.grad(lambda x: (kernels.causal_softmax(x, 0.7) * cot).sum())(x))
    close(got, 0.7 * P * (C - (P * C).sum(-1, keepdims=True)), ref, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("D", [97, 4099])
def test_rms_norm(portable, native, D):
    x, w = mx.random.normal((2, 3, D)), mx.random.normal((D,))
    X = f64(x)
    got, ref = both(portable, native, lambda kernels: kernels.rms_norm(x, w, 1e-5))
    # rtol: a float32 sum of 4099 squares one after another is off by a few 1e-6
    close(got, X / np.sqrt((X ** 2).mean(-1, keepdims=True) + 1e-5) * f64(w), ref, atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims,offset", [(38, 0), (38, 3000), (22, 7)])  # 22: part of the head turns
def test_rope(portable, native, traditional, dims, offset):
    x = mx.random.normal((2, 3, 5, 38))
    got, ref = both(portable, native, lambda kernels: kernels.rope(x, dims, traditional, 10000.0, 1.0, offset))
    close(got, rope_float64(x, dims, traditional, 10000.0, offset), ref, atol=2e-6)


@pytest.mark.parametrize("T,S,H", [(3, 40, 16), (1, 333, 70), (2, 600, 88)])  # 333, 600: split between threads
def test_attention_of_grouped_query_heads(portable, native, T, S, H):
    """6 query heads on 2 key-value heads, keys and values slices of a longer buffer
    (as the KV cache hands them over)."""
    q = mx.random.normal((2, 6, T, H))
    k_buf, v_buf = mx.random.normal((2, 2, S + 50, H)), mx.random.normal((2, 2, S + 50, H))
    k, v = k_buf[:, :, 10:10 + S], v_buf[:, :, 10:10 + S]
    scale = H ** -0.5
    got, ref = both(portable, native, lambda kernels: kernels.attention(q, k, v, scale))
    close(got, attention_float64(q, k, v, scale), ref, atol=1e-5)


def test_without_amx_bfloat16_products_are_said_unavailable(portable):
    """Built without AMX, the bfloat16 products report so and refuse to run, rather than
    computing something else."""
    assert portable.bf16_products() is False
    with pytest.raises(RuntimeError, match="AMX"):
        portable.bf16_matmul(mx.ones((2, 4)), mx.ones((3, 4)), True)
