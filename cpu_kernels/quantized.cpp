// MLX's affine-quantized weights (2, 3, 4, 5, 6 or 8 bits): x @ dequantize(w)^T for
// the few rows of decoding, and dequantize for the products of a prompt or QLoRA
// training. MLX's own quantized matmul and dequantize are single-threaded scalar loops
// on the CPU; these are threaded and vectorised.
//
// Layout of MLX's affine quantization (mode "affine"): each row of a [N, K] float
// matrix is one little-endian bit stream, value k in bits [bits * k, bits * (k + 1)),
// stored as uint32 words [N, K * bits / 32]; and per group of group_size consecutive
// values along K a scale and a bias: w = scale * q + bias. 2, 4 and 8 bits fill each
// word with whole values; 3, 5 and 6 bits cross from word to word.
//
// The vector paths need AVX-512's byte instructions (BW) too, as every AVX-512 CPU
// but the Xeon Phi has them.

#include <algorithm>
#include <array>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

// The fewest whole words that hold whole values, a pack: one word of 16, 8 or 4 values
// (2, 4, 8 bits), 3 words of 32 (3 bits), 5 of 32 (5 bits), 3 of 16 (6 bits).
constexpr int pack_values(int bits) { return 32 / std::gcd(bits, 32); }

template <int BITS>
struct Packing {
  static constexpr int values = pack_values(BITS);
  static constexpr int words = values * BITS / 32;
  static constexpr uint32_t mask = (1u << BITS) - 1;

  // Value i of a pack: its low bits from word BITS * i / 32, the rest from the next
  // word when it crosses (i is a constant once the loops over a pack are unrolled).
  static uint32_t value(const uint32_t* pack, int i) {
    const int bit = BITS * i, shift = bit % 32;
    uint32_t q = pack[bit / 32] >> shift;
    if (shift + BITS > 32) q |= pack[bit / 32 + 1] << (32 - shift);
    return q & mask;
  }
};

// Sums of x over each group of its values: [M, groups]. The biases then cost one
// multiply-add a group, not one a weight.
std::vector<float> group_sums(const float* x, int M, int K, int group_size) {
  std::vector<float> xsum(size_t(M) * (K / group_size), 0.0f);
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) xsum[size_t(m) * (K / group_size) + k / group_size] += x[size_t(m) * K + k];
  return xsum;
}

// ---------------------------------------------------------------- values from bytes

#if defined(__AVX512BW__)
// Values k..k+15 of a row (k a multiple of 16) as 16 integers, for every width. Their
// 2 * BITS bytes are loaded (masked: never past the row) into each 128-bit lane; lane l
// takes the two bytes its value starts in (BITS + 7 <= 16 bits hold it), then a
// variable shift and a mask leave the value.
template <int BITS>
struct ValueBytes {
  static constexpr int bytes = 2 * BITS;
  static constexpr auto pick = [] {  // per lane: its first byte, the next, two zeros (-128)
    std::array<int8_t, 64> at{};
    for (int l = 0; l < 16; l++) {
      at[4 * l] = int8_t(BITS * l / 8);
      at[4 * l + 1] = int8_t(BITS * l / 8 + 1);  // past the 16 values' bytes: masked off after
      at[4 * l + 2] = at[4 * l + 3] = -128;
    }
    return at;
  }();
  static constexpr auto shift = [] {
    std::array<int32_t, 16> by{};
    for (int l = 0; l < 16; l++) by[l] = BITS * l % 8;
    return by;
  }();
};

template <int BITS>
inline __m512i values16(const uint8_t* row, int k) {
  using V = ValueBytes<BITS>;
  const __m512i loaded = _mm512_maskz_loadu_epi8((1ull << V::bytes) - 1, row + k * BITS / 8);
  const __m512i pairs = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(loaded, loaded, 0),
                                            _mm512_loadu_si512(V::pick.data()));
  return _mm512_and_si512(_mm512_srlv_epi32(pairs, _mm512_loadu_si512(V::shift.data())),
                          _mm512_set1_epi32(Packing<BITS>::mask));
}
#endif

// ---------------------------------------------------------------- quantized matvec

#if defined(__AVX512BW__)
// Values k..k+31 of a row as floats in x's order. The bytes of MLX's words hold the
// values in order (little-endian): 8 bits one a byte, 4 bits two, the even one in the
// low nibble. So 16 bytes zero-extended to 16 lanes are 16 values (8 bits) or 32 (4
// bits: masked, the even ones; shifted, the odd ones, against x deinterleaved to
// match). Other widths cross bytes: values16, twice.
template <int BITS>
inline void byte_values32(const uint8_t* qn, int k, __m512& q0, __m512& q1) {
  if (BITS == 8) {
    q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k))));
    q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k + 16))));
  } else if (BITS == 4) {
    const __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k / 2)));
    q0 = _mm512_cvtepi32_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(15)));
    q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(pairs, 4));
  } else {
    q0 = _mm512_cvtepi32_ps(values16<BITS>(qn, k));
    q1 = _mm512_cvtepi32_ps(values16<BITS>(qn, k + 16));
  }
}

// Weight rows byte_quantized_block reads side by side, each with two independent
// multiply-add chains (one waited on the 4-cycle latency of each multiply-add). Below
// 8 bits the loop is compute-bound (a load, a zero-extension or a shuffle, a mask or
// shift, a conversion and a multiply-add per 16 values): four rows keep more work in
// flight. 8 bits are nearer memory-bound, and two streams are followed better than four.
template <int BITS>
constexpr int SIDE_BY_SIDE = BITS == 8 ? 2 : 4;

// The SIDE_BY_SIDE weight rows from n0 (fewer at the end; the last row stands in for
// missing ones) against every row of x, each stream asked for PREFETCH_AHEAD, so that
// the loads of every row are already in cache when its multiply-adds need them.
template <int BITS>
void byte_quantized_block(const float* xs, const uint32_t* wq, const float* scales, const float* biases,
                          const float* xsum, float* y, int M, int N, int K, int group_size, int64_t n0) {
  constexpr int R = SIDE_BY_SIDE<BITS>, STEP_BYTES = 32 * BITS / 8;
  const int groups = K / group_size, rows = std::min<int64_t>(R, N - n0);
  const uint8_t* qn[R];  // row n0 + r's bytes and scales; the last row stands in for missing ones
  const float* sn[R];
  for (int r = 0; r < R; r++) {
    const size_t n = n0 + std::min(r, rows - 1);
    qn[r] = reinterpret_cast<const uint8_t*>(wq) + n * K * BITS / 8;
    sn[r] = scales + n * groups;
  }
  for (int m = 0; m < M; m++) {
    const float* xm = xs + size_t(m) * K;
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
      __m512 part[R][2];  // x . q over the group, 16 lanes, two chains
      for (int r = 0; r < R; r++) part[r][0] = part[r][1] = _mm512_setzero_ps();
      for (int k = g * group_size; k < (g + 1) * group_size; k += 32) {
        const __m512 x0 = _mm512_loadu_ps(xm + k), x1 = _mm512_loadu_ps(xm + k + 16);
        // once per cache line: by the step that starts in it (steps of 12 to 32 bytes)
        if (m == 0 && k * BITS / 8 % 64 < STEP_BYTES)
          for (int r = 0; r < R; r++) prefetch_ahead(qn[r] + k * BITS / 8);
        for (int r = 0; r < R; r++) {
          __m512 q0, q1;
          byte_values32<BITS>(qn[r], k, q0, q1);
          part[r][0] = _mm512_fmadd_ps(q0, x0, part[r][0]);
          part[r][1] = _mm512_fmadd_ps(q1, x1, part[r][1]);
        }
      }
      for (int r = 0; r < R; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_add_ps(part[r][0], part[r][1]),
                                 _mm512_set1_ps(sn[r][g]), acc[r]);
    }
    for (int r = 0; r < rows; r++) {
      float out = _mm512_reduce_add_ps(acc[r]);
      const float* bn = biases + size_t(n0 + r) * groups;
      for (int g = 0; g < groups; g++) out += bn[g] * xsum[size_t(m) * groups + g];
      y[size_t(m) * N + n0 + r] = out;
    }
  }
}

// The case of quantized_matvec_rows for groups of 32 values or more: each value takes
// a conversion and a multiply-add.
template <int BITS>
void byte_quantized_matvec_rows(
    const float* x, const uint32_t* wq, const float* scales, const float* biases,
    float* y, int M, int N, int K, int group_size) {
  const std::vector<float> xsum = group_sums(x, M, K, group_size);
  std::vector<float> xs(x, x + size_t(M) * K);  // 4 bits: per 32 values, the even then the odd
  if (BITS == 4)
    for (size_t c = 0; c < xs.size(); c += 32)
      for (int l = 0; l < 16; l++) xs[c + l] = x[c + 2 * l], xs[c + 16 + l] = x[c + 2 * l + 1];
  parallel_for(row_blocks(N), [&](int64_t first, int64_t end) {
    for (int64_t n = first * BLOCK_ROWS; n < std::min<int64_t>(N, end * BLOCK_ROWS); n += SIDE_BY_SIDE<BITS>)
      byte_quantized_block<BITS>(xs.data(), wq, scales, biases, xsum.data(), y, M, N, K, group_size, n);
  });
}
#endif

// y[m, n] = sum_g scale[n, g] * (x[m, group g] . q[n, group g]) + bias[n, g] * sum(x[m, group g]).
// This pack-by-pack loop serves groups of 16, and every case without AVX-512.
template <int BITS>
void quantized_matvec_rows(
    const float* x, const uint32_t* wq, const float* scales, const float* biases,
    float* y, int M, int N, int K, int group_size) {
#if defined(__AVX512BW__)
  if (group_size >= 32)
    return byte_quantized_matvec_rows<BITS>(x, wq, scales, biases, y, M, N, K, group_size);
#endif
  using P = Packing<BITS>;
  const int packs = K / P::values, groups = K / group_size;
  const int packs_per_group = group_size / P::values;  // check_quantized: groups hold whole packs
  // x reordered so that value i of every pack is contiguous, [M, values, packs]:
  // the inner loop then runs over whole packs with plain vector loads of x.
  const std::vector<float> xsum = group_sums(x, M, K, group_size);
  std::vector<float> xt(size_t(M) * K);
  for (int m = 0; m < M; m++)
    for (int j = 0; j < packs; j++)
      for (int i = 0; i < P::values; i++)
        xt[size_t(m) * K + size_t(i) * packs + j] = x[size_t(m) * K + size_t(j) * P::values + i];
  parallel_for(N, [&](int64_t first, int64_t end) {
    std::vector<float> pack_dots(packs);  // [packs], x . q of each pack
    for (int n = int(first); n < int(end); n++) {
      const uint32_t* wn = wq + size_t(n) * packs * P::words;
      const float* sn = scales + size_t(n) * groups;
      const float* bn = biases + size_t(n) * groups;
      for (int m = 0; m < M; m++) {
        const float* xm = xt.data() + size_t(m) * K;
#pragma omp simd
        for (int j = 0; j < packs; j++) {
          float acc = 0.0f;
          for (int i = 0; i < P::values; i++)
            acc += xm[size_t(i) * packs + j] * float(P::value(wn + size_t(j) * P::words, i));
          pack_dots[j] = acc;
        }
        float out = 0.0f;
        for (int g = 0; g < groups; g++) {
          float dot = 0.0f;
          for (int j = g * packs_per_group; j < (g + 1) * packs_per_group; j++) dot += pack_dots[j];
          out += sn[g] * dot + bn[g] * xsum[size_t(m) * groups + g];
        }
        y[size_t(m) * N + n] = out;
      }
    }
  });
}

// ---------------------------------------------------------------- dequantize

// The dequantized weights as float32, or as bfloat16 for the bfloat16 products (half the
// bytes to write and read again; bf16_matmul would round them the same way).
inline float stored_as(float v, float*) { return v; }
inline uint16_t stored_as(float v, uint16_t*) { return to_bf16(v); }

#if defined(__AVX512BW__)
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(uint16_t* out, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float values[16];
  _mm512_store_ps(values, v);
  for (int i = 0; i < 16; i++) out[i] = to_bf16(values[i]);
#endif
}

// One row, 16 values at a time (group sizes are multiples of 16): values16, a
// conversion and a fused multiply-add.
template <int BITS, typename Out>
void dequantize_row(const uint32_t* wn, const float* sn, const float* bn, Out* out, int K, int group_size) {
  const uint8_t* row = reinterpret_cast<const uint8_t*>(wn);
  for (int k = 0; k < K; k += 16) {
    const int g = k / group_size;
    store16(out + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(values16<BITS>(row, k)), _mm512_set1_ps(sn[g]),
                                     _mm512_set1_ps(bn[g])));
  }
}
#else
// One row, a pack at a time (groups hold whole packs).
template <int BITS, typename Out>
void dequantize_row(const uint32_t* wn, const float* sn, const float* bn, Out* out, int K, int group_size) {
  using P = Packing<BITS>;
  for (int j = 0; j < K / P::values; j++) {
    const float scale = sn[j * P::values / group_size], bias = bn[j * P::values / group_size];
    for (int i = 0; i < P::values; i++)
      out[j * P::values + i] = stored_as(scale * float(P::value(wn + j * P::words, i)) + bias, out);
  }
}
#endif

template <int BITS, typename Out>
void dequantize_rows(
    const uint32_t* wq, const float* scales, const float* biases, Out* w,
    int N, int K, int group_size) {
  const int words = K * BITS / 32, groups = K / group_size;
  parallel_for(N, [&](int64_t first, int64_t end) {
    for (int64_t n = first; n < end; n++)
      dequantize_row<BITS>(wq + size_t(n) * words, scales + size_t(n) * groups, biases + size_t(n) * groups,
                           w + size_t(n) * K, K, group_size);
  });
}

// ---------------------------------------------------------------- primitives

// The bit width is a template parameter of the loops (their shifts and masks are then
// constants); by_bits picks the instance for a width known only at run time.
template <template <int> class Kernel, typename... Args>
void by_bits(int bits, Args... args) {
  switch (bits) {
    case 2: return Kernel<2>::run(args...);
    case 3: return Kernel<3>::run(args...);
    case 4: return Kernel<4>::run(args...);
    case 5: return Kernel<5>::run(args...);
    case 6: return Kernel<6>::run(args...);
    case 8: return Kernel<8>::run(args...);
    default: throw std::invalid_argument("cpu_kernels: bits must be 2, 3, 4, 5, 6 or 8");
  }
}
template <int B> struct QuantizedMatvecKernel {
  template <typename... A> static void run(A... a) { quantized_matvec_rows<B>(a...); }
};
template <int B> struct DequantizeKernel {
  template <typename... A> static void run(A... a) { dequantize_rows<B>(a...); }
};

// MLX affine-quantized weights of a group size and bit width.
struct QuantizedParams {
  int group_size, bits;
  mx::Dtype out = mx::float32;  // what dequantize writes: two of other dtypes are not the same op
  bool operator==(const QuantizedParams&) const = default;
};

class QuantizedMatvec : public CpuPrimitiveWith<QuantizedParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int N = in[1].shape(0), K = in[1].shape(1) * 32 / p.bits, M = in[0].size() / K;
      by_bits<QuantizedMatvecKernel>(p.bits, in[0].data<float>(), in[1].data<uint32_t>(), in[2].data<float>(),
                                     in[3].data<float>(), out.data<float>(), M, N, K, p.group_size);
    });
  }
  // Frozen weights (QLoRA): only x has a gradient, through MLX's quantized matmul.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    for (int arg : argnums)
      if (arg != 0) throw std::invalid_argument("QuantizedMatvec: no gradient for the quantized weights");
    return {mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], false,
                                 p_.group_size, p_.bits, "affine", stream())};
  }
  const char* name() const override { return "QuantizedMatvec"; }
};

class Dequantize : public CpuPrimitiveWith<QuantizedParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int N = out.shape(0), K = out.shape(1);
      const auto* wq = in[0].data<uint32_t>();
      const auto* scales = in[1].data<float>();
      const auto* biases = in[2].data<float>();
      if (out.dtype() == mx::float32)
        by_bits<DequantizeKernel>(p.bits, wq, scales, biases, out.data<float>(), N, K, p.group_size);
      else
        by_bits<DequantizeKernel>(p.bits, wq, scales, biases, out.data<uint16_t>(), N, K, p.group_size);
    });
  }
  const char* name() const override { return "Dequantize"; }
};

void check_quantized(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits) {
  if (bits < 2 || bits > 8 || bits == 7) throw std::invalid_argument("bits must be 2, 3, 4, 5, 6 or 8");
  if (wq.dtype() != mx::uint32 || wq.ndim() != 2) throw std::invalid_argument("w must be a 2-D uint32 array");
  check_float32(scales, "scales");
  check_float32(biases, "biases");
  if (wq.shape(1) * 32 % bits != 0) throw std::invalid_argument("w's rows are not whole packs of values");
  const int K = wq.shape(1) * 32 / bits;
  // Powers of two from 16 (MLX's own are 32, 64 and 128): groups then never straddle
  // the 16 or 32 values the vector loops take at a time, nor a pack.
  if (group_size < 16 || (group_size & (group_size - 1)) != 0 || group_size % pack_values(bits) != 0)
    throw std::invalid_argument("group_size must be a power of two from 16 (from 32 for 3 and 5 bits)");
  if (K % group_size != 0 || scales.shape() != mx::Shape{wq.shape(0), K / group_size} || biases.shape() != scales.shape())
    throw std::invalid_argument("scales and biases do not fit w for this group size");
}

}  // namespace

// x [..., K] @ dequantize(w)^T -> [..., N], float32
mx::array quantized_matvec(const mx::array& x, const mx::array& wq, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits) {
  check_float32(x, "x");
  check_quantized(wq, scales, biases, group_size, bits);
  if (x.ndim() < 1 || x.shape(-1) != wq.shape(1) * 32 / bits)
    throw std::invalid_argument("quantized_matvec: x does not fit w");
  auto s = cpu_stream();
  return mx::array(with_last(x.shape(), wq.shape(0)), mx::float32,
                   std::make_shared<QuantizedMatvec>(s, QuantizedParams{group_size, bits}),
                   {x, wq, scales, biases});
}

// w [N, K * bits / 32] uint32 -> [N, K] float32 (or bfloat16, rounded to nearest even)
mx::array dequantize(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, mx::Dtype dtype) {
  check_quantized(wq, scales, biases, group_size, bits);
  if (dtype != mx::float32 && dtype != mx::bfloat16) throw std::invalid_argument("dtype must be float32 or bfloat16");
  auto s = cpu_stream();
  return mx::array({wq.shape(0), wq.shape(1) * 32 / bits}, dtype,
                   std::make_shared<Dequantize>(s, QuantizedParams{group_size, bits, dtype}),
                   {wq, scales, biases});
}

}  // namespace cpu_kernels
