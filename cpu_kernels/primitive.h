// The MLX side shared by every kernel file: each kernel is a lazy MLX primitive, so
// that it joins MLX's graph (mx.compile, mx.grad, async evaluation) like MLX's own
// operations, and runs on the CPU stream's thread when its outputs are evaluated.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace cpu_kernels {

namespace mx = mlx::core;

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

inline mx::array packed(const mx::array& a) {
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

// The gradients of `all` (one per primal) that argnums asks for: a vjp computes them
// all at once when one primitive yields them together.
inline std::vector<mx::array> chosen(const std::vector<mx::array>& all, const std::vector<int>& argnums) {
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(all[arg]);
  return out;
}

inline std::runtime_error cpu_only(const char* name) {
  return std::runtime_error(std::string(name) + " runs on the CPU only");
}

// One output, CPU only; equal to another of its kind unless it has parameters (so
// that mx.compile may merge two identical calls).
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

// A kernel in place of an mx.fast function of the same parameters P: its gradient
// goes through MLX's own composition of that function (mlx_fn), so the kernel only
// replaces the forward pass and needs no backward of its own.
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

// A single scale (the causal softmax's and attention's): the parameters of primitives
// in more than one file.
struct ScaleParams {
  float scale;
  bool operator==(const ScaleParams&) const = default;
};

// ---------------------------------------------------------------- for the op functions

inline mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

// Raised as ValueError in Python: a wrong dtype would otherwise be read as float32.
inline void check_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + " must be float32");
}

inline mx::Shape with_last(mx::Shape shape, int last) {
  shape.back() = last;
  return shape;
}

}  // namespace cpu_kernels
