// The softmax of attention over many queries (training, prompts), under the causal
// mask, with its gradient. MLX's CPU softmax takes one exp at a time on one core, and
// mx.fast's attention builds and applies its causal mask as more single-threaded
// passes: in a LoRA step that softmax, not attention's two BLAS products, was the
// slow part.
//
// Rows of x [..., T, S]: row t is the query at position t + S - T of S keys (MLX's
// "causal": the queries are the last T positions) and sees keys 0 .. t + S - T, or with a
// window W (Mistral's, Gemma's windowed blocks) the last W of those. With a cap c > 0 (Gemma
// 2's soft-capped scores) the softmax is of c tanh(scale x / c), in the same pass.

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

struct SoftmaxParams {
  float scale;
  int window;  // 0: none
  float cap;   // 0: none
  bool operator==(const SoftmaxParams&) const = default;
};

// p = softmax(scale * x), or softmax(cap tanh(scale * x / cap)), over the keys row t sees, 0 elsewhere
void causal_softmax_rows(const float* x, float* p, int64_t rows, int T, int S, SoftmaxParams params) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; r++) {
      const float* xr = x + size_t(r) * S;
      float* pr = p + size_t(r) * S;
      const auto [from, to] = seen_keys(r, T, S, params.window);
      std::fill(pr, pr + from, 0.0f);
      if (params.cap > 0) {  // the capped scores, then their softmax, in the output row
        row_tanh(xr + from, params.scale / params.cap, pr + from, to - from);
        row_softmax(pr + from, params.cap, pr + from, to - from);
      } else {
        row_softmax(xr + from, params.scale, pr + from, to - from);
      }
      std::fill(pr + to, pr + S, 0.0f);
    }
  });
}

// dx = scale * p * (g - sum(p * g)), times 1 - tanh^2(scale x / cap) under a cap: the gradient of
// causal_softmax_rows, from its output p (and, under a cap, its input x)
void causal_softmax_grad_rows(const float* p, const float* g, const float* x, float* dx, int64_t rows, int T,
                              int S, SoftmaxParams params) {
  parallel_for(rows, [&](int64_t first, int64_t end) {
    std::vector<float> t(params.cap > 0 ? S : 0);  // a row of tanh(scale x / cap)
    for (int64_t r = first; r < end; r++) {
      const size_t at = size_t(r) * S;
      const float *pr = p + at, *gr = g + at;
      float* dr = dx + at;
      const auto [from, to] = seen_keys(r, T, S, params.window);
      const float pg = dot<false>(pr + from, gr + from, to - from), scale = params.scale;
      std::fill(dr, dr + from, 0.0f);
#pragma omp simd
      for (int s = from; s < to; s++) dr[s] = scale * pr[s] * (gr[s] - pg);
      if (params.cap > 0) {
        row_tanh(x + at + from, scale / params.cap, t.data(), to - from);
#pragma omp simd
        for (int s = from; s < to; s++) dr[s] *= 1.0f - t[s - from] * t[s - from];
      }
      std::fill(dr + to, dr + S, 0.0f);
    }
  });
}

class CausalSoftmaxGrad : public CpuPrimitiveWith<SoftmaxParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      const int T = out.shape(-2), S = out.shape(-1);
      const float* x = p.cap > 0 ? in[2].data<float>() : nullptr;
      causal_softmax_grad_rows(in[0].data<float>(), in[1].data<float>(), x, out.data<float>(), out.size() / S, T,
                               S, p);
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
      causal_softmax_rows(in[0].data<float>(), out.data<float>(), out.size() / S, T, S, p);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>& outputs) override {  // from the probabilities alone (x freed) but under a cap
    auto s = stream();
    std::vector<mx::array> in{outputs[0], mx::astype(cotangents[0], mx::float32, s)};
    if (p_.cap > 0) in.push_back(primals[0]);
    return {mx::array(outputs[0].shape(), mx::float32, std::make_shared<CausalSoftmaxGrad>(s, p_), std::move(in))};
  }
  const char* name() const override { return "CausalSoftmax"; }
};

}  // namespace

// softmax(scale * x) along the last axis of float32 x [..., T, S] under MLX's causal mask:
// row t sees keys 0 .. t + S - T, the last `window` of them if window > 0 (T <= S, scale > 0);
// with cap > 0, softmax(cap tanh(scale * x / cap))
mx::array causal_softmax(const mx::array& x, float scale, int window, float cap) {
  check_float32(x, "x");
  if (x.ndim() < 2 || x.shape(-2) > x.shape(-1) || !(scale > 0) || window < 0 || !(cap >= 0))
    throw std::invalid_argument(
        "causal_softmax: x [..., T, S] with T <= S, a positive scale, a window >= 0, a cap >= 0");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CausalSoftmax>(cpu_stream(), SoftmaxParams{scale, window, cap}), {x});
}

}  // namespace cpu_kernels
