// The norm, RoPE and attention of decoding: a few rows each. On the CPU,
// mx.fast.rms_norm, rope and scaled_dot_product_attention are compositions of 8 to 25
// MLX operations, whose per-call overhead dominates at one token; these do the same
// arithmetic in one pass each. Their gradients go through MLX's own (FastStandIn).

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include "mlx/fast.h"

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

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
// (i, i + dims/2). The angles are computed in double: a float32 angle of a position in
// the thousands has lost digits that the rotation shows (MLX's own, on the CPU, has).
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
  // Too little work to pay for waking the other threads: run it on this one.
  if (groups * rep * S * H < (int64_t(1) << 17)) some_groups(0, groups);
  else parallel_for(groups, some_groups);
}

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

}  // namespace

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

}  // namespace cpu_kernels
