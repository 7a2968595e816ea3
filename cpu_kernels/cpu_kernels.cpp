// CPU kernels MLX lacks on x86, as lazy MLX primitives: multi-threaded float32
// matrix-vector products, 2/4/8-bit affine (de)quantized products, fused
// cross-entropy, SwiGLU and the causal softmax of attention with their gradients,
// one-pass RMS norm, RoPE and attention for the few rows of decoding, and float16
// weights read as they are.
//
// Why: on the CPU, MLX runs a one-row matmul as a BLAS GEMM that repacks the whole
// weight (about a third of the memory bandwidth), and its quantized matmul and
// dequantize are single-threaded scalar loops (about 1 and 0.3 billion weights/s).
// Its exp runs at about 80 million values a second, so the cross-entropy over a
// 32000-word vocabulary took a fifth of a LoRA step. Decoding, QLoRA training and
// the loss are bound by exactly these.
//
// Layout of MLX's affine quantization (mode "affine"): a [N, K] float matrix is
// stored as uint32 words [N, K * bits / 32], value i of a word in bits
// [bits * i, bits * (i + 1)), and per group of group_size consecutive values along
// K a scale and a bias: w = scale * q + bias.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <sched.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ---------------------------------------------------------------- threads

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One worker per core this process may run on, besides the calling thread, splitting
// each loop with it. Between loops a worker spins for up to 100 us, then sleeps on a
// futex. Waking a sleeping thread takes 15-60 us on this (virtual) machine, and a
// decoded token runs about 60 loops a few microseconds apart: the spin bridges those
// gaps (tiny model: 2.3 -> 1.75 ms a token) and ends long before a BLAS call of a
// prompt or a training step needs the core. Why not OpenMP: its sleeping threads took
// about 90 us to start a small matvec, and its spinning ones (OMP_WAIT_POLICY=active)
// keep the cores from the BLAS's own threads (prompts ran 2-3x slower).
class Workers {
 public:
  static Workers& get() {
    static Workers* workers = new Workers();  // never destroyed: the threads outlive statics
    return *workers;
  }

  // body(begin, end) on contiguous parts of [0, n), one part per thread.
  template <typename Body>
  void parallel_for(int64_t n, const Body& body) {
    const int parts = int(threads_.size()) + 1;
    if (n <= 1 || parts == 1) {
      if (n > 0) body(0, n);
      return;
    }
    auto run_part = [&](int part) {
      const int64_t begin = n * part / parts, end = n * (part + 1) / parts;
      if (begin < end) body(begin, end);
    };
    std::lock_guard<std::mutex> lock(mutex_);  // one loop at a time
    job_ = &run_part;
    call_ = [](const void* job, int part) { (*static_cast<const decltype(run_part)*>(job))(part); };
    pending_.store(parts - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    std::exception_ptr error;  // rethrown only once no worker still uses run_part
    try {
      run_part(0);
    } catch (...) {
      error = std::current_exception();
    }
    // The parts are even: the others finish about when this one does.
    for (int spins = 0;; spins++) {
      const int left = pending_.load(std::memory_order_acquire);
      if (left == 0) break;
      if (spins < 4096) cpu_relax();
      else pending_.wait(left, std::memory_order_acquire);
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  Workers() {
    cpu_set_t cpus;
    const int cores = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
    for (int part = 1; part < cores; part++) threads_.emplace_back([this, part] { work(part); });
    for (auto& t : threads_) t.detach();
  }

  void work(int part) {
    uint32_t seen = 0;  // the generation at construction: no loop was posted before
    for (;;) {
      spin_while_unchanged(seen, std::chrono::microseconds(100));
      generation_.wait(seen, std::memory_order_acquire);  // returns once it differs
      seen = generation_.load(std::memory_order_acquire);
      call_(job_, part);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }

  void spin_while_unchanged(uint32_t seen, std::chrono::microseconds limit) const {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (int i = 1; generation_.load(std::memory_order_acquire) == seen; i++)
      if (i % 64 != 0) cpu_relax();
      else if (std::chrono::steady_clock::now() > until) return;
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  const void* job_ = nullptr;
  void (*call_)(const void*, int) = nullptr;
};

template <typename Body>
void parallel_for(int64_t n, const Body& body) {
  Workers::get().parallel_for(n, body);
}

// ---------------------------------------------------------------- the loops

// The matvecs ask for each weight row's bytes this far ahead, once per cache line: the
// hardware prefetchers alone left the loops waiting on memory. In-process A/B over
// 0-16 KB, the 150M model's weights a token (4-16 KB equal): float32 13.9 -> 12.9 ms,
// float16 8.6 -> 7.8 ms (the quantized ones: below).
constexpr int PREFETCH_AHEAD = 8192;  // bytes

// Weight rows a matvec's threads share out at a time.
constexpr int BLOCK_ROWS = 4;

int64_t row_blocks(int64_t N) { return (N + BLOCK_ROWS - 1) / BLOCK_ROWS; }

inline void prefetch_ahead(const void* at) {
  __builtin_prefetch(static_cast<const char*>(at) + PREFETCH_AHEAD, 0, 3);  // read, keep in every cache level
}

#if defined(__AVX512F__)
// 16 weights from w + k as floats: float32 as they are, float16 converted (exactly)
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const mx::float16_t* w) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)w)); }
#endif

// x . w over K values: x float32, w float or float16, with four multiply-add chains.
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

// y[m, n] = x[m, :] . w[n, :] for the block of BLOCK_ROWS weight rows from n0 (fewer at
// the end) and a few rows m of x, each weight read once. One weight row after another,
// so that a thread reads one sequential stream: four rows side by side made the
// prefetchers follow four (in-process A/B, the 150M model's weights a token: float32
// 15.6 -> 12.6 ms, float16 8.1 -> 7.1 ms). The rows of x after the first find the
// weight row in L1. W: float, or float16 (decoding a float16 model reads half the bytes).
template <typename W>
void matvec_block(const float* x, const W* w, float* y, int M, int N, int K, int n0) {
  for (int n = n0; n < std::min(n0 + BLOCK_ROWS, N); n++) {
    const W* wn = w + size_t(n) * K;
    y[n] = dot<true>(x, wn, K);
    for (int m = 1; m < M; m++) y[size_t(m) * N + n] = dot<false>(x + size_t(m) * K, wn, K);
  }
}

// y_i = x @ w_i^T for weights w_i [N_i, K] of the same input x [M, K], M small: one
// loop over the row blocks of all of them, so that the projections of one input
// (queries, keys and values; the two halves of the gated feed-forward) cost one
// start of the threads, not one each.
template <typename W>
void matvec_rows(const float* x, const std::vector<const W*>& w, const std::vector<float*>& y,
                 const std::vector<int>& N, int M, int K) {
  std::vector<int64_t> first_block(w.size() + 1, 0);  // of each weight, in the joint count
  for (size_t i = 0; i < w.size(); i++) first_block[i + 1] = first_block[i] + row_blocks(N[i]);
  parallel_for(first_block.back(), [&](int64_t first, int64_t end) {
    size_t i = std::upper_bound(first_block.begin(), first_block.end(), first) - first_block.begin() - 1;
    for (int64_t blk = first; blk < end; blk++) {
      while (blk >= first_block[i + 1]) i++;
      matvec_block(x, w[i], y[i], M, N[i], K, int(blk - first_block[i]) * BLOCK_ROWS);
    }
  });
}

template <int BITS>
struct Packing {
  static constexpr int per_word = 32 / BITS;
  static constexpr uint32_t mask = (1u << BITS) - 1;
};

// Sums of x over each group of its values: [M, groups]
std::vector<float> group_sums(const float* x, int M, int K, int group_size) {
  std::vector<float> xsum(size_t(M) * (K / group_size), 0.0f);
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) xsum[size_t(m) * (K / group_size) + k / group_size] += x[size_t(m) * K + k];
  return xsum;
}

#if defined(__AVX512F__)
// Values k..k+15 and k+16..k+31 of a row of 8- or 4-bit weights, as floats in x's
// order. The bytes of MLX's words hold the values in order (little-endian): 8 bits one
// a byte, 4 bits two, the even one in the low nibble. So 16 bytes zero-extended to 16
// lanes are 16 values (8 bits) or 32 (4 bits: masked, the even ones; shifted, the odd
// ones, against x deinterleaved to match).
template <int BITS>
inline void byte_values32(const uint8_t* qn, int k, __m512& q0, __m512& q1) {
  if (BITS == 8) {
    q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k))));
    q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k + 16))));
  } else {
    const __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + k / 2)));
    q0 = _mm512_cvtepi32_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(15)));
    q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(pairs, 4));
  }
}

// Weight rows byte_quantized_block reads side by side, each with two independent
// multiply-add chains (one waited on the 4-cycle latency of each multiply-add). 4 bits
// are compute-bound (a load, a zero-extension, a mask or shift, a conversion and a
// multiply-add per 16 values): four rows keep more work in flight. 8 bits are nearer
// memory-bound, and two streams are followed better than four. In-process A/B, a token
// of the 150M model: 8 bits 5.0-5.1 -> 4.8 ms (two rows against four); 4 bits 4.4 -> 5.1
// ms with two rows, 7.3 with one.
template <int BITS>
constexpr int SIDE_BY_SIDE = BITS == 8 ? 2 : 4;

// The SIDE_BY_SIDE weight rows from n0 (fewer at the end; the last row stands in for
// missing ones) against every row of x, each stream asked for PREFETCH_AHEAD. Per
// token of the 150M model, in-process A/B: the 8-bit matvecs 6.5 -> 5.4 ms, the
// 4-bit 8-9 -> 5.3 ms (two chains and the prefetch, against one chain).
template <int BITS>
void byte_quantized_block(const float* xs, const uint32_t* wq, const float* scales, const float* biases,
                          const float* xsum, float* y, int M, int N, int K, int group_size, int64_t n0) {
  constexpr int R = SIDE_BY_SIDE<BITS>;
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
        if (m == 0 && k * BITS / 8 % 64 == 0)  // once per cache line
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

// The 8- and 4-bit case of quantized_matvec_rows, for groups of 32 values or more:
// each value takes a conversion and a multiply-add.
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

// y[m, n] = sum_g scale[n, g] * (x[m, group g] . q[n, group g]) + bias[n, g] * sum(x[m, group g])
template <int BITS>
void quantized_matvec_rows(
    const float* x, const uint32_t* wq, const float* scales, const float* biases,
    float* y, int M, int N, int K, int group_size) {
#if defined(__AVX512F__)
  if ((BITS == 8 || BITS == 4) && group_size >= 32)
    return byte_quantized_matvec_rows<BITS>(x, wq, scales, biases, y, M, N, K, group_size);
#endif
  using P = Packing<BITS>;
  const int words = K / P::per_word, groups = K / group_size;
  const int words_per_group = group_size / P::per_word;
  // x reordered so that value i of every word is contiguous, [M, per_word, words]:
  // the inner loop then runs over whole words with plain vector loads.
  const std::vector<float> xsum = group_sums(x, M, K, group_size);
  std::vector<float> xt(size_t(M) * K);
  for (int m = 0; m < M; m++)
    for (int j = 0; j < words; j++)
      for (int i = 0; i < P::per_word; i++)
        xt[size_t(m) * K + size_t(i) * words + j] = x[size_t(m) * K + size_t(j) * P::per_word + i];
  parallel_for(N, [&](int64_t first, int64_t end) {
    std::vector<float> word_dots(words);  // [words], x . q of each word
    for (int n = int(first); n < int(end); n++) {
      const uint32_t* wn = wq + size_t(n) * words;
      const float* sn = scales + size_t(n) * groups;
      const float* bn = biases + size_t(n) * groups;
      for (int m = 0; m < M; m++) {
        const float* xm = xt.data() + size_t(m) * K;
#pragma omp simd
        for (int j = 0; j < words; j++) {
          const uint32_t word = wn[j];
          float acc = 0.0f;
          for (int i = 0; i < P::per_word; i++)
            acc += xm[size_t(i) * words + j] * float((word >> (BITS * i)) & P::mask);
          word_dots[j] = acc;
        }
        float out = 0.0f;
        for (int g = 0; g < groups; g++) {
          float dot = 0.0f;
          for (int j = g * words_per_group; j < (g + 1) * words_per_group; j++) dot += word_dots[j];
          out += sn[g] * dot + bn[g] * xsum[size_t(m) * groups + g];
        }
        y[size_t(m) * N + n] = out;
      }
    }
  });
}

#if defined(__AVX512F__)
// One row, 16 values at a time: lane l takes value l % per_word of word l / per_word
// of the chunk's 1, 2 or 4 words (2, 4 or 8 bits), so a chunk is one masked load,
// a permute, a variable shift, a mask, a conversion and a fused multiply-add.
template <int BITS>
void dequantize_row(const uint32_t* wn, const float* sn, const float* bn, float* out, int K, int group_size) {
  using P = Packing<BITS>;
  constexpr int words_per_chunk = 16 / P::per_word;
  alignas(64) int32_t word_of[16], shift_of[16];
  for (int l = 0; l < 16; l++) {
    word_of[l] = l / P::per_word;
    shift_of[l] = BITS * (l % P::per_word);
  }
  const __m512i index = _mm512_load_si512(word_of), shifts = _mm512_load_si512(shift_of);
  const __m512i mask = _mm512_set1_epi32(P::mask);
  for (int c = 0; c < K / 16; c++) {
    const __m512i words = _mm512_maskz_loadu_epi32(__mmask16((1u << words_per_chunk) - 1), wn + c * words_per_chunk);
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(index, words), shifts), mask);
    const int g = c * 16 / group_size;  // group sizes are multiples of 16
    _mm512_storeu_ps(out + c * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sn[g]), _mm512_set1_ps(bn[g])));
  }
}
#else
template <int BITS>
void dequantize_row(const uint32_t* wn, const float* sn, const float* bn, float* out, int K, int group_size) {
  using P = Packing<BITS>;
  for (int k = 0; k < K; k++)
    out[k] = sn[k / group_size] * float((wn[k / P::per_word] >> (BITS * (k % P::per_word))) & P::mask) + bn[k / group_size];
}
#endif

template <int BITS>
void dequantize_rows(
    const uint32_t* wq, const float* scales, const float* biases, float* w,
    int N, int K, int group_size) {
  const int words = K / Packing<BITS>::per_word, groups = K / group_size;
  parallel_for(N, [&](int64_t first, int64_t end) {
    for (int64_t n = first; n < end; n++)
      dequantize_row<BITS>(wq + size_t(n) * words, scales + size_t(n) * groups, biases + size_t(n) * groups,
                           w + size_t(n) * K, K, group_size);
  });
}

// ---------------------------------------------------------------- cross-entropy

#if defined(__AVX512F__)
// exp(x), 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor polynomial (relative error about 1e-7), times 2^n. NaN stays NaN.
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

float row_max(const float* x, int V) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int v = 0;
  for (; v + 16 <= V; v += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + v));
  float out = _mm512_reduce_max_ps(m);
  for (; v < V; v++) out = std::max(out, x[v]);
  return out;
}

// sum of exp(alpha * x - shift)
float row_sum_exp(const float* x, float alpha, float shift, int V) {
  __m512 s = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(alpha), sh = _mm512_set1_ps(shift);
  int v = 0;
  for (; v + 16 <= V; v += 16) s = _mm512_add_ps(s, exp16(_mm512_fmsub_ps(a, _mm512_loadu_ps(x + v), sh)));
  float out = _mm512_reduce_add_ps(s);
  for (; v < V; v++) out += std::exp(alpha * x[v] - shift);
  return out;
}

// out = scale * exp(alpha * x - shift)
void row_scaled_exp(const float* x, float alpha, float shift, float scale, float* out, int V) {
  const __m512 a = _mm512_set1_ps(alpha), sh = _mm512_set1_ps(shift), sc = _mm512_set1_ps(scale);
  int v = 0;
  for (; v + 16 <= V; v += 16)
    _mm512_storeu_ps(out + v, _mm512_mul_ps(sc, exp16(_mm512_fmsub_ps(a, _mm512_loadu_ps(x + v), sh))));
  for (; v < V; v++) out[v] = scale * std::exp(alpha * x[v] - shift);
}
#else
float row_max(const float* x, int V) {
  float out = -INFINITY;
  for (int v = 0; v < V; v++) out = std::max(out, x[v]);
  return out;
}
float row_sum_exp(const float* x, float alpha, float shift, int V) {
  float out = 0.0f;
  for (int v = 0; v < V; v++) out += std::exp(alpha * x[v] - shift);
  return out;
}
void row_scaled_exp(const float* x, float alpha, float shift, float scale, float* out, int V) {
  for (int v = 0; v < V; v++) out[v] = scale * std::exp(alpha * x[v] - shift);
}
#endif

// out = softmax(alpha * x) over n values (alpha > 0); out may be x
void row_softmax(const float* x, float alpha, float* out, int n) {
  const float shift = alpha * row_max(x, n);
  row_scaled_exp(x, alpha, shift, 1.0f / row_sum_exp(x, alpha, shift, n), out, n);
}

// loss[m] = logsumexp(logits[m]) - logits[m, target[m]]; NaN for a target outside [0, V).
void cross_entropy_rows(const float* logits, const int32_t* targets, float* loss, int M, int V) {
  parallel_for(M, [&](int64_t first, int64_t end) {
    for (int64_t m = first; m < end; m++) {
      const float* row = logits + size_t(m) * V;
      const float top = row_max(row, V);
      const float lse = top + std::log(row_sum_exp(row, 1.0f, top, V));
      const int t = targets[m];
      loss[m] = (t >= 0 && t < V) ? lse - row[t] : NAN;
    }
  });
}

// dlogits[m] = cotan[m] * (softmax(logits[m]) - onehot(target[m])), with lse[m] from forward.
void cross_entropy_grad_rows(const float* logits, const int32_t* targets, const float* lse,
                             const float* cotan, float* out, int M, int V) {
  parallel_for(M, [&](int64_t first, int64_t end) {
    for (int64_t m = first; m < end; m++) {
      row_scaled_exp(logits + size_t(m) * V, 1.0f, lse[m], cotan[m], out + size_t(m) * V, V);
      const int t = targets[m];
      if (t >= 0 && t < V) out[size_t(m) * V + t] -= cotan[m];
    }
  });
}

// ---------------------------------------------------------------- SwiGLU

#if defined(__AVX512F__)
inline __m512 sigmoid16(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}
#endif
inline float sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

// body(begin, end) over the elements [0, n), split between the threads in chunks.
template <typename Body>
void parallel_elements(size_t n, const Body& body) {
  constexpr size_t chunk = 4096;
  parallel_for(int64_t((n + chunk - 1) / chunk), [&](int64_t first, int64_t last) {
    body(size_t(first) * chunk, std::min(n, size_t(last) * chunk));
  });
}

// out = silu(a) * b = a * sigmoid(a) * b
void swiglu_values(const float* a, const float* b, float* out, size_t n) {
  parallel_elements(n, [&](size_t start, size_t end) {
    size_t i = start;
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16) {
      const __m512 x = _mm512_loadu_ps(a + i);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid16(x)), _mm512_loadu_ps(b + i)));
    }
#endif
    for (; i < end; i++) out[i] = a[i] * sigmoid(a[i]) * b[i];
  });
}

// da = g * b * s * (1 + a * (1 - s)), db = g * a * s, with s = sigmoid(a)
void swiglu_grads(const float* a, const float* b, const float* g, float* da, float* db, size_t n) {
  parallel_elements(n, [&](size_t start, size_t end) {
    size_t i = start;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= end; i += 16) {
      const __m512 x = _mm512_loadu_ps(a + i), y = _mm512_loadu_ps(b + i), c = _mm512_loadu_ps(g + i);
      const __m512 s = sigmoid16(x), gs = _mm512_mul_ps(c, s);
      _mm512_storeu_ps(db + i, _mm512_mul_ps(gs, x));
      const __m512 slope = _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one);
      _mm512_storeu_ps(da + i, _mm512_mul_ps(_mm512_mul_ps(gs, y), slope));
    }
#endif
    for (; i < end; i++) {
      const float s = sigmoid(a[i]);
      db[i] = g[i] * s * a[i];
      da[i] = g[i] * s * b[i] * (1.0f + a[i] * (1.0f - s));
    }
  });
}

// ---------------------------------------------------------------- float16 weights

// out = x as float32 (exact), on every thread: the weights of a float16 model for the
// products of a prompt (MLX's conversion: about 1.2 G values/s on one core)
void widen_float16(const mx::float16_t* x, float* out, size_t n) {
  parallel_elements(n, [&](size_t start, size_t end) {
    size_t i = start;
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16) _mm512_storeu_ps(out + i, load16(x + i));
#endif
    for (; i < end; i++) out[i] = float(x[i]);
  });
}

// ---------------------------------------------------------------- causal softmax
// The softmax of attention over many queries (training, prompts). MLX's CPU softmax
// takes one exp at a time on one core, and mx.fast's attention builds and applies
// its causal mask as more single-threaded passes: in a LoRA step of the 150M model
// (batch 4 x 256) that attention took about a fifth of the step, its two products
// in BLAS a small part of it.
//
// Rows of x [..., T, S]: row t is the query at position t + S - T of S keys (MLX's
// "causal": the queries are the last T positions) and sees keys 0 .. t + S - T.

// p = softmax(alpha * x) over the keys row t sees, 0 beyond (alpha > 0)
void causal_softmax_rows(const float* x, float* p, int64_t rows, int T, int S, float alpha) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; r++) {
      const float* xr = x + size_t(r) * S;
      float* pr = p + size_t(r) * S;
      const int seen = int(r % T) + S - T + 1;
      row_softmax(xr, alpha, pr, seen);
      std::fill(pr + seen, pr + S, 0.0f);
    }
  });
}

// dx = alpha * p * (g - sum(p * g)): the gradient of causal_softmax_rows, from its output p
void causal_softmax_grad_rows(const float* p, const float* g, float* dx, int64_t rows, int T, int S,
                              float alpha) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; r++) {
      const size_t at = size_t(r) * S;
      const float *pr = p + at, *gr = g + at;
      float* dr = dx + at;
      const int seen = int(r % T) + S - T + 1;
      const float pg = dot<false>(pr, gr, seen);
#pragma omp simd
      for (int s = 0; s < seen; s++) dr[s] = alpha * pr[s] * (gr[s] - pg);
      std::fill(dr + seen, dr + S, 0.0f);
    }
  });
}

// ---------------------------------------------------------------- decoding: norm, RoPE, attention
// On the CPU, mx.fast.rms_norm, rope and scaled_dot_product_attention are compositions
// of 8 to 25 MLX operations: for one decoded token they cost 30, 70-120 and 150 us
// per call, about a fifth of a float32 decoding step on the 150M model. These do
// the same arithmetic for the few rows of decoding in one pass each.

// out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w
void rms_norm_rows(const float* x, const float* w, float eps, float* out, int M, int D) {
  for (int m = 0; m < M; m++) {
    const float* xm = x + size_t(m) * D;
    float* om = out + size_t(m) * D;
    const float squares = dot<false>(xm, xm, D);
    const float r = 1.0f / std::sqrt(squares / float(D) + eps);
#pragma omp simd
    for (int d = 0; d < D; d++) om[d] = xm[d] * r * w[d];
  }
}

// Rotary position embedding of x [rows, T, H], position of t: (offset + t) * scale.
// The first `dims` values of a position turn in pairs, pair i by position *
// base^(-i / (dims/2)): pairs (2i, 2i+1) when traditional (Meta's layout), else
// (i, i + dims/2). The angles are computed in double: a float32 angle of a position
// in the thousands is off by up to 1e-3 (MLX's own, on the CPU, is), these by 1e-7.
void rope_rows(const float* x, float* out, int64_t rows, int T, int H, int dims, bool traditional,
               float base, float scale, int offset) {
  const int half = dims / 2;
  std::vector<float> cos_th(size_t(T) * half), sin_th(size_t(T) * half);  // [T, half]
  for (int t = 0; t < T; t++) {
    const double position = double(offset + t) * scale;
    for (int i = 0; i < half; i++) {
      const double theta = position * std::pow(double(base), -double(i) / half);
      cos_th[size_t(t) * half + i] = std::cos(theta);
      sin_th[size_t(t) * half + i] = std::sin(theta);
    }
  }
  const int pair_stride = traditional ? 2 : 1, second = traditional ? 1 : half;
  for (int64_t r = 0; r < rows; r++) {
    for (int t = 0; t < T; t++) {
      const size_t at = (size_t(r) * T + t) * H;
      const float *xt = x + at, *c = cos_th.data() + size_t(t) * half, *s = sin_th.data() + size_t(t) * half;
      float* ot = out + at;
      for (int i = 0; i < half; i++) {
        const int a = i * pair_stride, b = a + second;
        const float x1 = xt[a], x2 = xt[b];
        ot[a] = x1 * c[i] - x2 * s[i];
        ot[b] = x1 * s[i] + x2 * c[i];
      }
      std::copy(xt + dims, xt + H, ot + dims);
    }
  }
}

// A [B, heads, S, H] float32 array whose rows of H values are contiguous: the KV cache
// hands its keys and values over as slices of a longer buffer, so the other strides
// are read, not assumed.
struct Strided4 {
  const float* data;
  int64_t stride[3];
  const float* row(int64_t b, int64_t head, int64_t s) const {
    return data + b * stride[0] + head * stride[1] + s * stride[2];
  }
};

// out[b, n, t] = softmax_s(scale * q[b, n, t] . k[b, n / rep, s]) @ v[b, n / rep, s],
// every query seeing all S keys (decoding: no mask); rep = N / K query heads share a
// key-value head (grouped-query attention), and are taken together: each key and
// value row is read once for all of them. q and out [B, N, T, H] are contiguous.
void attention_rows(const float* q, Strided4 k, Strided4 v, float* out, int B, int N, int T, int K, int S,
                    int H, float scale) {
  const int rep = N / K;
  // The rep queries of key-value head kv at position t: p_RS [rep, S], q_RH [rep, H]
  auto one_group = [&](int64_t group, std::vector<float>& p_RS, std::vector<float>& q_RH) {
    const int64_t b = group / (int64_t(K) * T), kv = group / T % K, t = group % T;
    auto row = [&](int j) { return ((b * N + kv * rep + j) * T + t) * H; };  // of query head kv * rep + j
    for (int j = 0; j < rep; j++)
      for (int h = 0; h < H; h++) q_RH[j * H + h] = scale * q[row(j) + h];  // scaled first, as MLX does
    for (int s = 0; s < S; s++) {
      const float* kr = k.row(b, kv, s);
      for (int j = 0; j < rep; j++) p_RS[size_t(j) * S + s] = dot<false>(q_RH.data() + j * H, kr, H);
    }
    for (int j = 0; j < rep; j++) {
      row_softmax(p_RS.data() + size_t(j) * S, 1.0f, p_RS.data() + size_t(j) * S, S);
      std::fill(out + row(j), out + row(j) + H, 0.0f);
    }
    for (int s = 0; s < S; s++) {
      const float* vr = v.row(b, kv, s);
      for (int j = 0; j < rep; j++) {
        const float p = p_RS[size_t(j) * S + s];
        float* o = out + row(j);
#pragma omp simd
        for (int h = 0; h < H; h++) o[h] += p * vr[h];
      }
    }
  };
  const int64_t groups = int64_t(B) * K * T;
  auto some_groups = [&](int64_t first, int64_t end) {
    std::vector<float> p_RS(size_t(rep) * S), q_RH(size_t(rep) * H);
    for (int64_t group = first; group < end; group++) one_group(group, p_RS, q_RH);
  };
  // Waking the other threads costs about as much as 64K multiply-adds.
  if (groups * rep * S * H < (int64_t(1) << 17)) some_groups(0, groups);
  else parallel_for(groups, some_groups);
}

template <template <int> class Kernel, typename... Args>
void by_bits(int bits, Args... args) {
  switch (bits) {
    case 2: return Kernel<2>::run(args...);
    case 4: return Kernel<4>::run(args...);
    case 8: return Kernel<8>::run(args...);
    default: throw std::invalid_argument("cpu_kernels: bits must be 2, 4 or 8");
  }
}
template <int B> struct QuantizedMatvecKernel {
  template <typename... A> static void run(A... a) { quantized_matvec_rows<B>(a...); }
};
template <int B> struct DequantizeKernel {
  template <typename... A> static void run(A... a) { dequantize_rows<B>(a...); }
};

// ---------------------------------------------------------------- primitives

// A row-contiguous copy of a strided array of 4-byte values (float32, int32, uint32)
// or 2-byte ones (float16 weights).
template <typename T>
void copy_in_order(const mx::array& a, T* dst) {
  const T* src = a.data<T>();
  std::vector<int> index(a.ndim(), 0);
  for (size_t i = 0; i < a.size(); i++) {
    int64_t at = 0;
    for (int d = 0; d < a.ndim(); d++) at += index[d] * a.strides(d);
    dst[i] = src[at];
    for (int d = a.ndim() - 1; d >= 0 && ++index[d] == a.shape(d); d--) index[d] = 0;
  }
}

mx::array packed(const mx::array& a) {
  mx::array out(mx::allocator::malloc(a.nbytes()), a.shape(), a.dtype());
  if (a.itemsize() == 4) copy_in_order(a, out.data<uint32_t>());
  else if (a.itemsize() == 2) copy_in_order(a, out.data<uint16_t>());
  else throw std::invalid_argument("cpu_kernels: inputs must have 2- or 4-byte values");
  return out;
}

// Shared plumbing: allocate the outputs, then run `body(inputs, outputs)` on the
// stream's thread with every array kept alive until it has finished. The first
// `n_packed` inputs (all by default) reach body row-contiguous: packed there when a
// view is not, instead of a Contiguous node in the graph for every input, which on
// every decoded token cost graph time for nothing (they almost always are).
template <typename Body>
void dispatch(mx::Stream stream, const std::vector<mx::array>& inputs, std::vector<mx::array> outputs, Body body,
              size_t n_packed = SIZE_MAX) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> in, out;
  for (auto& a : inputs) {
    encoder.set_input_array(a);
    in.push_back(mx::array::unsafe_weak_copy(a));
  }
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
    out.push_back(mx::array::unsafe_weak_copy(o));
  }
  encoder.dispatch([in = std::move(in), out = std::move(out), body, n_packed]() mutable {
    for (size_t i = 0; i < std::min(n_packed, in.size()); i++)
      if (!in[i].flags().row_contiguous) in[i] = packed(in[i]);
    body(in, out);
  });
}

// The gradients of `all` (one per primal) that argnums asks for.
std::vector<mx::array> chosen(const std::vector<mx::array>& all, const std::vector<int>& argnums) {
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(all[arg]);
  return out;
}

std::runtime_error cpu_only(const char* name) {
  return std::runtime_error(std::string(name) + " runs on the CPU only");
}

// One output, CPU only; equal to another of its kind unless it has parameters.
class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  using UnaryPrimitive::UnaryPrimitive;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw cpu_only(name()); }
  bool is_equivalent(const mx::Primitive&) const override { return true; }

 protected:
  // Run body(inputs, output) on the stream's thread (see dispatch).
  template <typename Body>
  void run(const std::vector<mx::array>& in, mx::array& out, Body body, size_t n_packed = SIZE_MAX) {
    dispatch(stream(), in, {out}, [body](std::vector<mx::array>& in, std::vector<mx::array>& outs) {
      body(in, outs[0]);
    }, n_packed);
  }
};

// The same for several outputs.
class CpuMultiPrimitive : public mx::Primitive {
 public:
  using Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { throw cpu_only(name()); }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// A CPU primitive with parameters P: equal to another of its kind with the same ones.
template <typename P>
class CpuPrimitiveWith : public CpuPrimitive {
 public:
  CpuPrimitiveWith(mx::Stream s, P p) : CpuPrimitive(s), p_(p) {}
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const CpuPrimitiveWith&>(other).p_;
  }

 protected:
  P p_;
};

// MLX affine-quantized weights of a group size and bit width.
struct QuantizedParams {
  int group_size, bits;
  bool operator==(const QuantizedParams&) const = default;
};

struct ScaleParams {
  float scale;
  bool operator==(const ScaleParams&) const = default;
};

// x [..., K] and weights w_1..w_n [N_i, K] -> x @ w_i^T [..., N_i]
class Matvecs : public CpuMultiPrimitive {
 public:
  using CpuMultiPrimitive::CpuMultiPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    dispatch(stream(), in, out, [](std::vector<mx::array>& in, std::vector<mx::array>& out) {
      const int K = in[0].shape(-1), M = in[0].size() / K;
      std::vector<float*> y;
      std::vector<int> N;
      for (size_t i = 0; i < out.size(); i++) {
        y.push_back(out[i].data<float>());
        N.push_back(in[i + 1].shape(0));
      }
      auto with_weights = [&](auto type) {  // every weight has the first one's type
        using W = decltype(type);
        std::vector<const W*> w;
        for (size_t i = 1; i < in.size(); i++) w.push_back(in[i].data<W>());
        matvec_rows(in[0].data<float>(), w, y, N, M, K);
      };
      if (in[1].dtype() == mx::float16) with_weights(mx::float16_t{});
      else with_weights(float{});
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    const auto& x = primals[0];
    const int K = x.shape(-1);
    auto cotan = [&](size_t i) { return mx::reshape(cotangents[i], {-1, primals[i + 1].shape(0)}, s); };  // [M, N_i]
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        auto dx = mx::matmul(cotan(0), primals[1], s);
        for (size_t i = 1; i < cotangents.size(); i++) dx = mx::add(dx, mx::matmul(cotan(i), primals[i + 1], s), s);
        grads.push_back(mx::reshape(dx, x.shape(), s));
      } else {
        const auto& w = primals[arg];
        grads.push_back(mx::astype(mx::matmul(mx::transpose(cotan(arg - 1), s), mx::reshape(x, {-1, K}, s), s),
                                   w.dtype(), s));
      }
    }
    return grads;
  }
  const char* name() const override { return "Matvecs"; }
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
      by_bits<DequantizeKernel>(p.bits, in[0].data<uint32_t>(), in[1].data<float>(), in[2].data<float>(),
                                out.data<float>(), N, K, p.group_size);
    });
  }
  const char* name() const override { return "Dequantize"; }
};

mx::array cross_entropy_grad(const mx::array& logits, const mx::array& targets, const mx::array& lse,
                             const mx::array& cotan, mx::Stream s);

class CrossEntropy : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      const int V = in[0].shape(-1), M = in[0].size() / V;
      cross_entropy_rows(in[0].data<float>(), in[1].data<int32_t>(), out.data<float>(), M, V);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    for (int arg : argnums)
      if (arg != 0) throw std::invalid_argument("CrossEntropy: targets have no gradient");
    const auto& logits = primals[0];
    const auto& targets = primals[1];
    auto s = stream();
    // logsumexp back from the loss: loss + the target's logit (M values, not M x V)
    auto target_logit = mx::squeeze(
        mx::take_along_axis(logits, mx::expand_dims(targets, -1, s), -1, s), -1, s);
    auto lse = mx::add(outputs[0], target_logit, s);
    return {cross_entropy_grad(logits, targets, lse, cotangents[0], s)};
  }
  const char* name() const override { return "CrossEntropy"; }
};

class CrossEntropyGrad : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      const int V = in[0].shape(-1), M = in[0].size() / V;
      cross_entropy_grad_rows(in[0].data<float>(), in[1].data<int32_t>(), in[2].data<float>(),
                              in[3].data<float>(), out.data<float>(), M, V);
    });
  }
  const char* name() const override { return "CrossEntropyGrad"; }
};

class SwigluGrads : public CpuMultiPrimitive {
 public:
  using CpuMultiPrimitive::CpuMultiPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    dispatch(stream(), in, out, [](std::vector<mx::array>& in, std::vector<mx::array>& out) {
      swiglu_grads(in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), out[0].data<float>(),
                   out[1].data<float>(), in[0].size());
    });
  }
  const char* name() const override { return "SwigluGrads"; }
};

class Swiglu : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      swiglu_values(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size());
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[0].shape()}, {mx::float32, mx::float32}, std::make_shared<SwigluGrads>(s),
        {primals[0], primals[1], mx::astype(cotangents[0], mx::float32, s)});
    return chosen(grads, argnums);
  }
  const char* name() const override { return "Swiglu"; }
};

class Float32Of : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      widen_float16(in[0].data<mx::float16_t>(), out.data<float>(), out.size());
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>&, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>&) override {
    return {mx::astype(cotangents[0], mx::float16, stream())};
  }
  const char* name() const override { return "Float32Of"; }
};

class CausalSoftmaxGrad : public CpuPrimitiveWith<ScaleParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int T = out.shape(-2), S = out.shape(-1);
      causal_softmax_grad_rows(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size() / S, T, S,
                               p.scale);
    });
  }
  const char* name() const override { return "CausalSoftmaxGrad"; }
};

class CausalSoftmax : public CpuPrimitiveWith<ScaleParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int T = out.shape(-2), S = out.shape(-1);
      causal_softmax_rows(in[0].data<float>(), out.data<float>(), out.size() / S, T, S, p.scale);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>&, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>& outputs) override {  // from the probabilities alone: x can be freed
    auto s = stream();
    return {mx::array(outputs[0].shape(), mx::float32, std::make_shared<CausalSoftmaxGrad>(s, p_),
                      {outputs[0], mx::astype(cotangents[0], mx::float32, s)})};
  }
  const char* name() const override { return "CausalSoftmax"; }
};

// A decoding kernel in place of an mx.fast function of the same parameters P: its
// gradient goes through MLX's own composition of that function (mlx_fn), so the
// kernel only replaces the forward pass.
template <typename P>
class FastStandIn : public CpuPrimitiveWith<P> {
 public:
  using ArraysFn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;
  using CpuPrimitiveWith<P>::CpuPrimitiveWith;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    return chosen(mx::vjp(mlx_fn(), primals, cotangents).second, argnums);
  }

 protected:
  virtual ArraysFn mlx_fn() = 0;
};

struct RmsNormParams {
  float eps;
  bool operator==(const RmsNormParams&) const = default;
};

class RmsNorm : public FastStandIn<RmsNormParams> {
 public:
  using FastStandIn::FastStandIn;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int D = in[0].shape(-1);
      rms_norm_rows(in[0].data<float>(), in[1].data<float>(), p.eps, out.data<float>(), in[0].size() / D, D);
    });
  }
  const char* name() const override { return "RmsNorm"; }

 protected:
  ArraysFn mlx_fn() override {
    return [p = p_, s = stream()](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], p.eps, s)};
    };
  }
};

struct RopeParams {
  int dims;
  bool traditional;
  float base, scale;
  int offset;
  bool operator==(const RopeParams&) const = default;
};

class Rope : public FastStandIn<RopeParams> {
 public:
  using FastStandIn::FastStandIn;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int H = in[0].shape(-1), T = in[0].shape(-2);
      rope_rows(in[0].data<float>(), out.data<float>(), in[0].size() / (int64_t(T) * H), T, H, p.dims,
                p.traditional, p.base, p.scale, p.offset);
    });
  }
  const char* name() const override { return "Rope"; }

 protected:
  ArraysFn mlx_fn() override {
    return [p = p_, s = stream()](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{
          mx::fast::rope(in[0], p.dims, p.traditional, p.base, p.scale, p.offset, std::nullopt, s)};
    };
  }
};

class Attention : public FastStandIn<ScaleParams> {
 public:
  using FastStandIn::FastStandIn;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      auto strided = [](mx::array& a) {
        if (a.strides(3) != 1) a = packed(a);  // rows of H values must be contiguous
        return Strided4{a.data<float>(), {a.strides(0), a.strides(1), a.strides(2)}};
      };
      const auto& q = in[0];
      attention_rows(q.data<float>(), strided(in[1]), strided(in[2]), out.data<float>(), q.shape(0), q.shape(1),
                     q.shape(2), in[1].shape(1), in[1].shape(2), q.shape(3), p.scale);
    }, /* n_packed: q; the cache's keys and values are read in place */ 1);
  }
  const char* name() const override { return "Attention"; }

 protected:
  ArraysFn mlx_fn() override {
    return [p = p_, s = stream()](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{
          mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], p.scale, "", {}, {}, false, s)};
    };
  }
};

// ---------------------------------------------------------------- operations

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

void check_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + " must be float32");
}

void check_quantized(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits) {
  if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("bits must be 2, 4 or 8");
  if (wq.dtype() != mx::uint32 || wq.ndim() != 2) throw std::invalid_argument("w must be a 2-D uint32 array");
  check_float32(scales, "scales");
  check_float32(biases, "biases");
  const int K = wq.shape(1) * 32 / bits;
  // Powers of two from 16 (MLX's own are 32, 64 and 128): groups then never straddle
  // the 16 or 32 values the vector loops take at a time.
  if (group_size < 16 || (group_size & (group_size - 1)) != 0)
    throw std::invalid_argument("group_size must be a power of two from 16");
  if (K % group_size != 0 || scales.shape() != mx::Shape{wq.shape(0), K / group_size} || biases.shape() != scales.shape())
    throw std::invalid_argument("scales and biases do not fit w for this group size");
}

mx::Shape with_last(mx::Shape shape, int last) {
  shape.back() = last;
  return shape;
}

// x [..., K] @ w_i [N_i, K]^T -> [..., N_i] for each weight: x float32, the weights float32
// or float16, the results float32
std::vector<mx::array> matvecs(const mx::array& x, const std::vector<mx::array>& w) {
  check_float32(x, "x");
  if (w.empty()) throw std::invalid_argument("matvecs: no weights");
  std::vector<mx::Shape> shapes;
  for (const auto& wi : w) {
    if ((wi.dtype() != mx::float32 && wi.dtype() != mx::float16) || wi.dtype() != w[0].dtype())
      throw std::invalid_argument("matvecs: the weights must all be float32 or all float16");
    if (wi.ndim() != 2 || x.ndim() < 1 || x.shape(-1) != wi.shape(1))
      throw std::invalid_argument("matvecs: x [..., K] and each w [N, K] must fit");
    shapes.push_back(with_last(x.shape(), wi.shape(0)));
  }
  std::vector<mx::array> inputs{x};
  inputs.insert(inputs.end(), w.begin(), w.end());
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(w.size(), mx::float32),
                                std::make_shared<Matvecs>(cpu_stream()), inputs);
}

// x [..., K] @ w [N, K]^T -> [..., N], float32 (w float32 or float16)
mx::array matvec(const mx::array& x, const mx::array& w) { return matvecs(x, {w})[0]; }

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

// w [N, K * bits / 32] uint32 -> [N, K] float32
mx::array dequantize(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits) {
  check_quantized(wq, scales, biases, group_size, bits);
  auto s = cpu_stream();
  return mx::array({wq.shape(0), wq.shape(1) * 32 / bits}, mx::float32,
                   std::make_shared<Dequantize>(s, QuantizedParams{group_size, bits}),
                   {wq, scales, biases});
}

// float16 x -> float32, same shape
mx::array to_float32(const mx::array& x) {
  if (x.dtype() != mx::float16) throw std::invalid_argument("to_float32: x must be float16");
  return mx::array(x.shape(), mx::float32, std::make_shared<Float32Of>(cpu_stream()), {x});
}

// logits [..., V] float32, targets [...] integer -> loss [...]
mx::array cross_entropy(const mx::array& logits, const mx::array& targets) {
  check_float32(logits, "logits");
  auto expected = logits.shape();
  expected.pop_back();
  if (logits.ndim() < 1 || targets.shape() != expected || !mx::issubdtype(targets.dtype(), mx::integer))
    throw std::invalid_argument("cross_entropy: targets must be integers shaped as logits without the last axis");
  auto s = cpu_stream();
  return mx::array(expected, mx::float32, std::make_shared<CrossEntropy>(s),
                   {logits, mx::astype(targets, mx::int32, s)});
}

mx::array cross_entropy_grad(const mx::array& logits, const mx::array& targets, const mx::array& lse,
                             const mx::array& cotan, mx::Stream s) {
  return mx::array(logits.shape(), mx::float32, std::make_shared<CrossEntropyGrad>(s),
                   {logits, targets, lse, mx::astype(cotan, mx::float32, s)});
}

// silu(a) * b, float32, same shapes
mx::array swiglu(const mx::array& a, const mx::array& b) {
  check_float32(a, "a");
  check_float32(b, "b");
  if (a.shape() != b.shape()) throw std::invalid_argument("swiglu: a and b must have the same shape");
  auto s = cpu_stream();
  return mx::array(a.shape(), mx::float32, std::make_shared<Swiglu>(s), {a, b});
}

// softmax(scale * x) along the last axis of float32 x [..., T, S] under MLX's causal mask:
// row t sees keys 0 .. t + S - T (T <= S, scale > 0)
mx::array causal_softmax(const mx::array& x, float scale) {
  check_float32(x, "x");
  if (x.ndim() < 2 || x.shape(-2) > x.shape(-1) || !(scale > 0))
    throw std::invalid_argument("causal_softmax: x [..., T, S] with T <= S, and a positive scale");
  return mx::array(x.shape(), mx::float32, std::make_shared<CausalSoftmax>(cpu_stream(), ScaleParams{scale}), {x});
}

// x [..., D] / sqrt(mean(x^2) + eps) * w [D], float32
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  check_float32(x, "x");
  check_float32(w, "w");
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: x [..., D] and w [D] do not fit");
  auto s = cpu_stream();
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(s, RmsNormParams{eps}), {x, w});
}

// mx.fast.rope of float32 x [..., T, H] with an integer offset
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset) {
  check_float32(x, "x");
  if (x.ndim() < 2 || dims <= 0 || dims % 2 != 0 || dims > x.shape(-1))
    throw std::invalid_argument("rope: dims must be even, positive and at most x's last axis");
  auto s = cpu_stream();
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(s, RopeParams{dims, traditional, base, scale, offset}), {x});
}

// softmax(scale * q @ k^T) @ v without a mask: q [B, N, T, H], k and v [B, K, S, H], N a multiple of K
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale) {
  check_float32(q, "q");
  check_float32(k, "k");
  check_float32(v, "v");
  if (q.ndim() != 4 || k.ndim() != 4 || k.shape() != v.shape() || k.shape(0) != q.shape(0) ||
      k.shape(3) != q.shape(3) || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("attention: q [B, N, T, H], k and v [B, K, S, H] with N a multiple of K");
  auto s = cpu_stream();
  return mx::array(q.shape(), mx::float32, std::make_shared<Attention>(s, ScaleParams{scale}), {q, k, v});
}

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "CPU kernels for MLX: float32 and quantized matvec, dequantize, float16 widening, cross-entropy, SwiGLU, causal softmax, and the norm, RoPE and attention of decoding.";
  m.def("matvec", &matvec, "x"_a, "w"_a, "x [..., K] @ w [N, K].T for a few rows of x (float32; w float32 or float16).");
  m.def("matvecs", &matvecs, "x"_a, "w"_a,
        "[x @ w.T for w in w] for a few rows of x, in one pass over all the weights (float32).");
  m.def("quantized_matvec", &quantized_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "x [..., K] @ dequantize(w).T for a few rows of x (float32 x, scales and biases).");
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "The float32 matrix of MLX affine-quantized weights.");
  m.def("to_float32", &to_float32, "x"_a, "float16 x as float32 (exact), on every thread.");
  m.def("cross_entropy", &cross_entropy, "logits"_a, "targets"_a,
        "logsumexp(logits) - logits[target] along the last axis (float32 logits).");
  m.def("swiglu", &swiglu, "a"_a, "b"_a, "silu(a) * b (float32).");
  m.def("causal_softmax", &causal_softmax, "x"_a, "scale"_a,
        "softmax(scale * x) along the last axis of x [..., T, S] under MLX's causal mask (float32).");
  m.def("rms_norm", &rms_norm, "x"_a, "w"_a, "eps"_a, "mx.fast.rms_norm for a few rows (float32).");
  m.def("rope", &rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "mx.fast.rope for a few positions (float32, integer offset).");
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "mx.fast.scaled_dot_product_attention without a mask, for a few queries (float32).");
}
