// The loss of a LoRA step: cross-entropy over the vocabulary with its gradient, in
// one threaded, vectorised pass each. MLX's CPU exp takes one value at a time, so
// over a vocabulary of tens of thousands of words the loss was a large part of a step.

#include <cmath>
#include <memory>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

// loss[m] = logsumexp(logits[m]) - logits[m, target[m]]; NaN for a target outside [0, V),
// so that a bad batch shows in the loss instead of reading out of bounds.
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

mx::array cross_entropy_grad(const mx::array& logits, const mx::array& targets, const mx::array& lse,
                             const mx::array& cotan, mx::Stream s) {
  return mx::array(logits.shape(), mx::float32, std::make_shared<CrossEntropyGrad>(s),
                   {logits, targets, lse, mx::astype(cotan, mx::float32, s)});
}

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

}  // namespace

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

}  // namespace cpu_kernels
