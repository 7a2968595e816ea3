// The softmax of attention over many queries (training, prompts), under the causal
// mask, with its gradient. MLX's CPU softmax takes one exp at a time on one core, and
// mx.fast's attention builds and applies its causal mask as more single-threaded
// passes: in a LoRA step that softmax, not attention's two BLAS products, was the
// slow part.
//
// Rows of x [..., T, S]: row t is the query at position t + S - T of S keys (MLX's
// "causal": the queries are the last T positions) and sees keys 0 .. t + S - T, or with a
// window W (Mistral's, Gemma's windowed blocks) the last W of those.

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

// [from, to): the keys row r sees (window 0: no window)
inline std::pair<int, int> seen_keys(int64_t r, int T, int S, int window) {
  const int to = int(r % T) + S - T + 1;
  return {window > 0 ? std::max(0, to - window) : 0, to};
}

// p = softmax(alpha * x) over the keys row t sees, 0 elsewhere (alpha > 0)
void causal_softmax_rows(const float* x, float* p, int64_t rows, int T, int S, float alpha, int window) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; r++) {
      const float* xr = x + size_t(r) * S;
      float* pr = p + size_t(r) * S;
      const auto [from, to] = seen_keys(r, T, S, window);
      std::fill(pr, pr + from, 0.0f);
      row_softmax(xr + from, alpha, pr + from, to - from);
      std::fill(pr + to, pr + S, 0.0f);
    }
  });
}

// dx = alpha * p * (g - sum(p * g)): the gradient of causal_softmax_rows, from its output p
void causal_softmax_grad_rows(const float* p, const float* g, float* dx, int64_t rows, int T, int S,
                              float alpha, int window) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; r++) {
      const size_t at = size_t(r) * S;
      const float *pr = p + at, *gr = g + at;
      float* dr = dx + at;
      const auto [from, to] = seen_keys(r, T, S, window);
      const float pg = dot<false>(pr + from, gr + from, to - from);
      std::fill(dr, dr + from, 0.0f);
#pragma omp simd
      for (int s = from; s < to; s++) dr[s] = alpha * pr[s] * (gr[s] - pg);
      std::fill(dr + to, dr + S, 0.0f);
    }
  });
}

struct SoftmaxParams {
  float scale;
  int window;  // 0: none
  bool operator==(const SoftmaxParams&) const = default;
};

class CausalSoftmaxGrad : public CpuPrimitiveWith<SoftmaxParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int T = out.shape(-2), S = out.shape(-1);
      causal_softmax_grad_rows(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size() / S, T, S,
                               p.scale, p.window);
    });
  }
  const char* name() const override { return "CausalSoftmaxGrad"; }
};

class CausalSoftmax : public CpuPrimitiveWith<SoftmaxParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int T = out.shape(-2), S = out.shape(-1);
      causal_softmax_rows(in[0].data<float>(), out.data<float>(), out.size() / S, T, S, p.scale, p.window);
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

}  // namespace

// softmax(scale * x) along the last axis of float32 x [..., T, S] under MLX's causal mask:
// row t sees keys 0 .. t + S - T, the last `window` of them if window > 0 (T <= S, scale > 0)
mx::array causal_softmax(const mx::array& x, float scale, int window) {
  check_float32(x, "x");
  if (x.ndim() < 2 || x.shape(-2) > x.shape(-1) || !(scale > 0) || window < 0)
    throw std::invalid_argument("causal_softmax: x [..., T, S] with T <= S, a positive scale, a window >= 0");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CausalSoftmax>(cpu_stream(), SoftmaxParams{scale, window}), {x});
}

}  // namespace cpu_kernels
