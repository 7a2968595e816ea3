// SwiGLU, silu(a) * b, the gate of the feed-forward, and its gradients: one threaded
// pass each, where MLX's composition takes several single-threaded passes and an exp
// at a time.

#include <memory>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

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

// Both gradients from one pass: they share the sigmoid.
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

}  // namespace

// silu(a) * b, float32, same shapes
mx::array swiglu(const mx::array& a, const mx::array& b) {
  check_float32(a, "a");
  check_float32(b, "b");
  if (a.shape() != b.shape()) throw std::invalid_argument("swiglu: a and b must have the same shape");
  auto s = cpu_stream();
  return mx::array(a.shape(), mx::float32, std::make_shared<Swiglu>(s), {a, b});
}

}  // namespace cpu_kernels
