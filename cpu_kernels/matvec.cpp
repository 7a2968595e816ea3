// Float weights: x @ w^T for the few rows of decoding (float32 or float16 weights,
// read as they are), and float16 weights widened to float32 for the products of a
// prompt. On the CPU, MLX runs a one-row matmul as a BLAS GEMM that first repacks the
// whole weight, spending a good part of the memory bandwidth on the copy, while a
// matvec only needs to read every weight once.

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

// y[m, n] = x[m, :] . w[n, :] for the block of BLOCK_ROWS weight rows from n0 (fewer at
// the end) and a few rows m of x, each weight read once. One weight row after another,
// so that a thread reads one sequential stream: the prefetchers follow one stream
// better than four rows side by side. The rows of x after the first find the weight
// row in L1. W: float, or float16 (decoding a float16 model reads half the bytes).
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

// out = x as float32 (exact), on every thread: the weights of a float16 model for the
// products of a prompt, which MLX converts on one core.
void widen_float16(const mx::float16_t* x, float* out, size_t n) {
  parallel_elements(n, [&](size_t start, size_t end) {
    size_t i = start;
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16) _mm512_storeu_ps(out + i, load16(x + i));
#endif
    for (; i < end; i++) out[i] = float(x[i]);
  });
}

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
  // Through MLX's matmul: gradients are taken over many rows (training), where BLAS wins.
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

}  // namespace

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

// float16 x -> float32, same shape
mx::array to_float32(const mx::array& x) {
  if (x.dtype() != mx::float16) throw std::invalid_argument("to_float32: x must be float16");
  return mx::array(x.shape(), mx::float32, std::make_shared<Float32Of>(cpu_stream()), {x});
}

}  // namespace cpu_kernels
