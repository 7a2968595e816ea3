// Element-wise activations and their gradients, one threaded pass each, where MLX's composition
// takes several single-threaded passes and an exp at a time: the feed-forward's gates, SwiGLU
// silu(a) * b (LLaMA, Qwen) and GeGLU gelu(a) * b (Gemma), GPT-2's ungated gelu(a), and Gemma 2's
// soft cap of the logits. tanh GELU is a sigmoid too: gelu(a) = a * sigmoid(u), u = K (a + C a^3),
// since (1 + tanh(z)) / 2 = sigmoid(2 z).

#include <algorithm>
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

constexpr float K = 1.5957691216057308f, C = 0.044715f;  // 2 sqrt(2 / pi), and GELU's cubic term

// The sigmoid's argument u and du/da: a and 1 for silu, K (a + C a^3) and K (1 + 3 C a^2) for gelu.
inline float gate_arg(float a, bool gelu) { return gelu ? K * a * (1.0f + C * a * a) : a; }
inline float gate_slope(float a, bool gelu) { return gelu ? K * (1.0f + 3.0f * C * a * a) : 1.0f; }

#if defined(__AVX512F__)
inline __m512 gate_arg16(__m512 a, bool gelu) {
  if (!gelu) return a;
  const __m512 a2 = _mm512_mul_ps(a, a);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(K), a), _mm512_fmadd_ps(_mm512_set1_ps(C), a2, _mm512_set1_ps(1.0f)));
}
inline __m512 gate_slope16(__m512 a, bool gelu) {
  if (!gelu) return _mm512_set1_ps(1.0f);
  const __m512 a2 = _mm512_mul_ps(a, a);
  return _mm512_mul_ps(_mm512_set1_ps(K), _mm512_fmadd_ps(_mm512_set1_ps(3.0f * C), a2, _mm512_set1_ps(1.0f)));
}
#endif

// out = a * sigmoid(u(a)) * b over n values, without b when not gated
template <bool gated>
void gate_span(const float* a, const float* b, float* out, size_t n, bool gelu) {
  size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(a + i);
    const __m512 v = _mm512_mul_ps(x, sigmoid16(gate_arg16(x, gelu)));
    _mm512_storeu_ps(out + i, gated ? _mm512_mul_ps(v, _mm512_loadu_ps(b + i)) : v);
  }
#endif
  for (; i < n; i++) out[i] = a[i] * sigmoid(gate_arg(a[i], gelu)) * (gated ? b[i] : 1.0f);
}

// da = g * b * s * (1 + a * (1 - s) * u'(a)), db = g * a * s, with s = sigmoid(u(a)), over n
// values; without b (and db) when not gated
template <bool gated>
void gate_grads_span(const float* a, const float* b, const float* g, float* da, float* db, size_t n, bool gelu) {
  size_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(a + i), c = _mm512_loadu_ps(g + i);
    const __m512 s = sigmoid16(gate_arg16(x, gelu)), gs = _mm512_mul_ps(c, s);
    if (gated) _mm512_storeu_ps(db + i, _mm512_mul_ps(gs, x));
    const __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(x, _mm512_sub_ps(one, s)), gate_slope16(x, gelu), one);
    const __m512 gsb = gated ? _mm512_mul_ps(gs, _mm512_loadu_ps(b + i)) : gs;
    _mm512_storeu_ps(da + i, _mm512_mul_ps(gsb, slope));
  }
#endif
  for (; i < n; i++) {
    const float s = sigmoid(gate_arg(a[i], gelu));
    if (gated) db[i] = g[i] * s * a[i];
    da[i] = g[i] * s * (gated ? b[i] : 1.0f) * (1.0f + a[i] * (1.0f - s) * gate_slope(a[i], gelu));
  }
}

template <bool gated>
void gate_values(const float* a, const float* b, float* out, size_t n, bool gelu) {
  parallel_elements(n, [&](size_t start, size_t end) {
    gate_span<gated>(a + start, gated ? b + start : nullptr, out + start, end - start, gelu);
  });
}

template <bool gated>
void gate_grads(const float* a, const float* b, const float* g, float* da, float* db, size_t n, bool gelu) {
  parallel_elements(n, [&](size_t start, size_t end) {
    gate_grads_span<gated>(a + start, gated ? b + start : nullptr, g + start, da + start, gated ? db + start : nullptr,
                           end - start, gelu);
  });
}

// Phi-3's gate and up in one linear's output, rows [a | b] of 2 * width values: span(i, at, n) for
// the pieces of outputs [start, end) that lie in one row, i the output's index and `at` a's
// offset in the input (b's is at + width).
template <typename Span>
void by_rows(size_t start, size_t end, size_t width, const Span& span) {
  while (start < end) {
    const size_t row = start / width, column = start % width, n = std::min(end - start, width - column);
    span(start, row * 2 * width + column, n);
    start += n;
  }
}

void gate_halves_values(const float* ab, float* out, size_t n, size_t width, bool gelu) {
  parallel_elements(n, [&](size_t start, size_t end) {
    by_rows(start, end, width, [&](size_t i, size_t at, size_t k) {
      gate_span<true>(ab + at, ab + at + width, out + i, k, gelu);
    });
  });
}

// d[a | b], both halves of the input's gradient written in place: no concatenation after
void gate_halves_grads(const float* ab, const float* g, float* dab, size_t n, size_t width, bool gelu) {
  parallel_elements(n, [&](size_t start, size_t end) {
    by_rows(start, end, width, [&](size_t i, size_t at, size_t k) {
      gate_grads_span<true>(ab + at, ab + at + width, g + i, dab + at, dab + at + width, k, gelu);
    });
  });
}

// Both gradients from one pass: they share the sigmoid.
class GateGrads : public CpuMultiPrimitive {
 public:
  GateGrads(mx::Stream s, bool gelu) : CpuMultiPrimitive(s), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const bool gelu = gelu_;
    dispatch(stream(), in, out, [gelu](std::vector<mx::array>& in, std::vector<mx::array>& out) {
      gate_grads<true>(in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), out[0].data<float>(),
                       out[1].data<float>(), in[0].size(), gelu);
    });
  }
  const char* name() const override { return gelu_ ? "GegluGrads" : "SwigluGrads"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return gelu_ == static_cast<const GateGrads&>(other).gelu_;
  }

 private:
  bool gelu_;
};

class Gate : public CpuPrimitive {
 public:
  Gate(mx::Stream s, bool gelu) : CpuPrimitive(s), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const bool gelu = gelu_;
    run(in, out, [gelu](std::vector<mx::array>& in, mx::array& out) {
      gate_values<true>(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size(), gelu);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[0].shape()}, {mx::float32, mx::float32}, std::make_shared<GateGrads>(s, gelu_),
        {primals[0], primals[1], mx::astype(cotangents[0], mx::float32, s)});
    return chosen(grads, argnums);
  }
  const char* name() const override { return gelu_ ? "Geglu" : "Swiglu"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return gelu_ == static_cast<const Gate&>(other).gelu_;  // compile must not merge the two gates
  }

 private:
  bool gelu_;
};

class GateHalvesGrad : public CpuPrimitive {
 public:
  GateHalvesGrad(mx::Stream s, bool gelu) : CpuPrimitive(s), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const bool gelu = gelu_;
    run(in, out, [gelu](std::vector<mx::array>& in, mx::array& out) {
      const size_t width = out.shape(-1) / 2;
      gate_halves_grads(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size() / 2, width, gelu);
    });
  }
  const char* name() const override { return gelu_ ? "GegluHalvesGrad" : "SwigluHalvesGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return gelu_ == static_cast<const GateHalvesGrad&>(other).gelu_;
  }

 private:
  bool gelu_;
};

class GateHalves : public CpuPrimitive {
 public:
  GateHalves(mx::Stream s, bool gelu) : CpuPrimitive(s), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const bool gelu = gelu_;
    run(in, out, [gelu](std::vector<mx::array>& in, mx::array& out) {
      gate_halves_values(in[0].data<float>(), out.data<float>(), out.size(), out.shape(-1), gelu);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>&) override {
    auto s = stream();
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GateHalvesGrad>(s, gelu_),
                      {primals[0], mx::astype(cotangents[0], mx::float32, s)})};
  }
  const char* name() const override { return gelu_ ? "GegluHalves" : "SwigluHalves"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return gelu_ == static_cast<const GateHalves&>(other).gelu_;
  }

 private:
  bool gelu_;
};

class GeluGrad : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      gate_grads<false>(in[0].data<float>(), nullptr, in[1].data<float>(), out.data<float>(), nullptr, out.size(),
                        true);
    });
  }
  const char* name() const override { return "GeluGrad"; }
};

class Gelu : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      gate_values<false>(in[0].data<float>(), nullptr, out.data<float>(), out.size(), true);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>&) override {
    auto s = stream();
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GeluGrad>(s),
                      {primals[0], mx::astype(cotangents[0], mx::float32, s)})};
  }
  const char* name() const override { return "Gelu"; }
};

struct CapParams {
  float cap, scale;
  bool operator==(const CapParams&) const = default;
};

// y = cap tanh(scale x / cap)
void soft_cap_values(const float* x, float* y, size_t n, CapParams p) {
  parallel_elements(n, [&](size_t start, size_t end) {
    row_tanh(x + start, p.scale / p.cap, y + start, end - start);
#pragma omp simd
    for (size_t i = start; i < end; i++) y[i] *= p.cap;
  });
}

// dx = g scale (1 - (y / cap)^2), from the output y
void soft_cap_grads(const float* y, const float* g, float* dx, size_t n, CapParams p) {
  const float inverse = 1.0f / p.cap;
  parallel_elements(n, [&](size_t start, size_t end) {
#pragma omp simd
    for (size_t i = start; i < end; i++) {
      const float t = y[i] * inverse;
      dx[i] = g[i] * p.scale * (1.0f - t * t);
    }
  });
}

class SoftCapGrad : public CpuPrimitiveWith<CapParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      soft_cap_grads(in[0].data<float>(), in[1].data<float>(), out.data<float>(), out.size(), p);
    });
  }
  const char* name() const override { return "SoftCapGrad"; }
};

class SoftCap : public CpuPrimitiveWith<CapParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [p = p_](std::vector<mx::array>& in, mx::array& out) {
      soft_cap_values(in[0].data<float>(), out.data<float>(), out.size(), p);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>&, const std::vector<mx::array>& cotangents, const std::vector<int>&,
      const std::vector<mx::array>& outputs) override {  // from the output: the logits can be freed
    auto s = stream();
    return {mx::array(outputs[0].shape(), mx::float32, std::make_shared<SoftCapGrad>(s, p_),
                      {outputs[0], mx::astype(cotangents[0], mx::float32, s)})};
  }
  const char* name() const override { return "SoftCap"; }
};

}  // namespace

// silu(a) * b, or with `gelu` the tanh GELU's gelu(a) * b; float32, same shapes
mx::array gate(const mx::array& a, const mx::array& b, bool gelu) {
  check_float32(a, "a");
  check_float32(b, "b");
  if (a.shape() != b.shape()) throw std::invalid_argument("gate: a and b must have the same shape");
  auto s = cpu_stream();
  return mx::array(a.shape(), mx::float32, std::make_shared<Gate>(s, gelu), {a, b});
}


// gate(a, b, gelu) of the halves of ab [..., 2 C]: a = ab[..., :C], b = ab[..., C:] (Phi-3's
// gate_up_proj), with no split of ab nor concatenation of its gradient; float32
mx::array gate_halves(const mx::array& ab, bool gelu) {
  check_float32(ab, "ab");
  if (ab.ndim() < 1 || ab.shape(-1) % 2) throw std::invalid_argument("gate_halves: ab's last axis must be even");
  auto shape = ab.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<GateHalves>(cpu_stream(), gelu), {ab});
}

// gelu(a) with the tanh GELU (GPT-2's ungated feed-forward); float32
mx::array gelu(const mx::array& a) {
  check_float32(a, "a");
  return mx::array(a.shape(), mx::float32, std::make_shared<Gelu>(cpu_stream()), {a});
}

// cap * tanh(scale * x / cap) (Gemma 2's soft cap of scores and logits); float32, cap > 0
mx::array soft_cap(const mx::array& x, float cap, float scale) {
  check_float32(x, "x");
  if (!(cap > 0) || !std::isfinite(scale)) throw std::invalid_argument("soft_cap: a cap > 0 and a finite scale");
  return mx::array(x.shape(), mx::float32, std::make_shared<SoftCap>(cpu_stream(), CapParams{cap, scale}), {x});
}

}  // namespace cpu_kernels
