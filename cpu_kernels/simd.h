// Vector helpers shared by several kernel files: dot products over weight rows,
// exp and the softmax pieces, sigmoid and tanh built on it. Each has an AVX-512 body and a portable
// one (#else, or the scalar tail loop); a build with MLX_LORA_PORTABLE compiles and
// tests the portable ones (see CMakeLists.txt).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "mlx/types/half_types.h"

namespace cpu_kernels {

namespace mx = mlx::core;

// ---------------------------------------------------------------- bfloat16

// float32 -> bfloat16 bits, to nearest, ties to even; NaN stays NaN. Shared by the
// bfloat16 products and the dequantization that feeds them.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------- streaming weight rows
// Shared by the float and the quantized matvecs, which read every weight once.

// The matvecs ask for each weight row's bytes this far ahead, once per cache line: the
// hardware prefetchers alone left the loops waiting on memory.
inline constexpr int PREFETCH_AHEAD = 8192;  // bytes

// Weight rows a matvec's threads share out at a time.
inline constexpr int BLOCK_ROWS = 4;

inline int64_t row_blocks(int64_t N) { return (N + BLOCK_ROWS - 1) / BLOCK_ROWS; }

inline void prefetch_ahead(const void* at) {
  __builtin_prefetch(static_cast<const char*>(at) + PREFETCH_AHEAD, 0, 3);  // read, keep in every cache level
}

// ---------------------------------------------------------------- dot products

#if defined(__AVX512F__)
// 16 weights from w + k as floats: float32 as they are, float16 converted (exactly),
// so that one dot serves float32 and float16 models.
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const mx::float16_t* w) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)w)); }
#endif

// x . w over K values: x float32, w float or float16, with four multiply-add chains
// (one would wait on each multiply-add's latency).
// `from_memory`: w comes from memory, so ask for its bytes ahead (once per cache line).
template <bool from_memory, typename W>
inline float dot(const float* x, const W* w, int K) {
  float sum = 0.0f;
  int k = 0;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 64 <= K; k += 64) {
    if (from_memory)
      for (size_t line = 0; line < 64 * sizeof(W); line += 64) prefetch_ahead(reinterpret_cast<const char*>(w + k) + line);
    a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(load16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a0);
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < K; k++) sum += x[k] * float(w[k]);
  return sum;
}

// ---------------------------------------------------------------- exp and softmax
// MLX's CPU exp takes one value at a time; the loss, the causal softmax and decoding
// attention take whole rows of it.

#if defined(__AVX512F__)
// exp(x), 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor polynomial (relative error about 1e-7), times 2^n. NaN stays NaN, so that a
// bad logit still shows in the loss.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // below, exp is 0 in float32; NaN passes
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline float row_max(const float* x, int V) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int v = 0;
  for (; v + 16 <= V; v += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + v));
  float out = _mm512_reduce_max_ps(m);
  for (; v < V; v++) out = std::max(out, x[v]);
  return out;
}

// sum of exp(alpha * x - shift)
inline float row_sum_exp(const float* x, float alpha, float shift, int V) {
  __m512 s = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(alpha), sh = _mm512_set1_ps(shift);
  int v = 0;
  for (; v + 16 <= V; v += 16) s = _mm512_add_ps(s, exp16(_mm512_fmsub_ps(a, _mm512_loadu_ps(x + v), sh)));
  float out = _mm512_reduce_add_ps(s);
  for (; v < V; v++) out += std::exp(alpha * x[v] - shift);
  return out;
}

// out = scale * exp(alpha * x - shift)
inline void row_scaled_exp(const float* x, float alpha, float shift, float scale, float* out, int V) {
  const __m512 a = _mm512_set1_ps(alpha), sh = _mm512_set1_ps(shift), sc = _mm512_set1_ps(scale);
  int v = 0;
  for (; v + 16 <= V; v += 16)
    _mm512_storeu_ps(out + v, _mm512_mul_ps(sc, exp16(_mm512_fmsub_ps(a, _mm512_loadu_ps(x + v), sh))));
  for (; v < V; v++) out[v] = scale * std::exp(alpha * x[v] - shift);
}
#else
inline float row_max(const float* x, int V) {
  float out = -INFINITY;
  for (int v = 0; v < V; v++) out = std::max(out, x[v]);
  return out;
}
inline float row_sum_exp(const float* x, float alpha, float shift, int V) {
  float out = 0.0f;
  for (int v = 0; v < V; v++) out += std::exp(alpha * x[v] - shift);
  return out;
}
inline void row_scaled_exp(const float* x, float alpha, float shift, float scale, float* out, int V) {
  for (int v = 0; v < V; v++) out[v] = scale * std::exp(alpha * x[v] - shift);
}
#endif

// out = softmax(alpha * x) over n values (alpha > 0); out may be x
inline void row_softmax(const float* x, float alpha, float* out, int n) {
  const float shift = alpha * row_max(x, n);
  row_scaled_exp(x, alpha, shift, 1.0f / row_sum_exp(x, alpha, shift, n), out, n);
}

#if defined(__AVX512F__)
inline __m512 sigmoid16(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}
#endif
inline float sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

// out = tanh(a * x) over n values (out may be x). tanh(z) = sign(z) (1 - e) / (1 + e) with
// e = exp(-2 |z|): no overflow, and near 0 an absolute error of about 1e-7.
inline void row_tanh(const float* x, float a, float* out, size_t n) {
  size_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f), alpha = _mm512_set1_ps(a);
  const __m512i sign_bit = _mm512_set1_epi32(INT32_MIN);
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_mul_ps(alpha, _mm512_loadu_ps(x + i));
    const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(z)));
    const __m512i t = _mm512_castps_si512(_mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e)));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), sign_bit);
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_or_si512(t, sign)));
  }
#endif
  for (; i < n; i++) out[i] = std::tanh(a * x[i]);
}

}  // namespace cpu_kernels
