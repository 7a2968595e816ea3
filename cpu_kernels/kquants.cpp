// GGUF's Q6_K superblocks held as they are (formats/gguf/kquants.py): x @ w^T straight from the
// blocks for the few rows of decoding, and the dense matrix for the products of a prompt or QLoRA.
// Each 16 values have an int8 scale of their own, which MLX's groups of 32 cannot hold, so no MLX
// quantization carries them exactly.
//
// A superblock is 210 bytes for 256 values: ql (128 bytes, the codes' low nibbles), qh (64, their
// top two bits), 16 int8 scales sc, and a float16 d. Value v of the superblock is
// (d * sc[v / 16]) * (q - 32), two float32 roundings, as llama.cpp and the gguf package compute it.
// Per half h of 128 values and l < 32: ql[64h + l] holds values l (low nibble) and l + 64 (high),
// ql[64h + 32 + l] values l + 32 and l + 96; qh[32h + l] their top bits, two each, in that order.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

namespace cpu_kernels {
namespace {

constexpr int QK_K = 256, Q6_K_BYTES = 210;

template <typename Out>
inline Out stored(float v) {
  if constexpr (std::is_same_v<Out, float>) return v;
  else return to_bf16(v);
}

// One superblock's 256 values, 16 at a time under one scale: the loop over l has no dependence
// between iterations and its scales are constants, so the compiler vectorises it.
template <typename Out>
void q6_k_superblock(const uint8_t* block, Out* out) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
  mx::float16_t d;
  std::memcpy(&d, block + 208, 2);
  for (int h = 0; h < 2; h++)
    for (int half = 0; half < 2; half++) {  // l in [16 half, 16 half + 16): sub-blocks 8h + half + 0, 2, 4, 6
      const uint8_t *ql = block + 64 * h + 16 * half, *qh = block + 128 + 32 * h + 16 * half;
      const int8_t* s = sc + 8 * h + half;
      // d * sc, rounded once, as the references round it
      const float s0 = float(d) * float(s[0]), s1 = float(d) * float(s[2]);
      const float s2 = float(d) * float(s[4]), s3 = float(d) * float(s[6]);
      Out* o = out + 128 * h + 16 * half;
#pragma omp simd
      for (int l = 0; l < 16; l++) {
        const int q0 = (ql[l] & 15) | ((qh[l] & 3) << 4), q1 = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
        const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), q3 = (ql[l + 32] >> 4) | ((qh[l] >> 6) << 4);
        o[l] = stored<Out>(s0 * float(q0 - 32));
        o[l + 32] = stored<Out>(s1 * float(q1 - 32));
        o[l + 64] = stored<Out>(s2 * float(q2 - 32));
        o[l + 96] = stored<Out>(s3 * float(q3 - 32));
      }
    }
}

template <typename Out>
void q6_k_rows(const uint8_t* blocks, Out* w, int64_t N, int64_t superblocks) {
  parallel_for(N, [&](int64_t first, int64_t end) {
    for (int64_t n = first; n < end; n++)
      for (int64_t s = 0; s < superblocks; s++)
        q6_k_superblock(blocks + (n * superblocks + s) * Q6_K_BYTES, w + (n * superblocks + s) * QK_K);
  });
}

// y[m, n] = x[m] . w[n] for a few rows of x, one superblock of w at a time made dense in a buffer
// that stays in L1 and serves every row of x: the weight is read once, as its blocks, and no dense
// copy of it is ever written (for a 7B model's Q6_K output layer, half a GiB a token).
void q6_k_matvec_rows(const float* x, const uint8_t* blocks, float* y, int M, int64_t N, int64_t superblocks) {
  const int64_t K = superblocks * QK_K;
  parallel_for(N, [&](int64_t first, int64_t end) {
    alignas(64) float w[QK_K];
    std::vector<float> acc(M);
    for (int64_t n = first; n < end; n++) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < superblocks; s++) {
        q6_k_superblock(blocks + (n * superblocks + s) * Q6_K_BYTES, w);
        for (int m = 0; m < M; m++) acc[m] += dot<false>(x + m * K + s * QK_K, w, QK_K);
      }
      for (int m = 0; m < M; m++) y[m * N + n] = acc[m];
    }
  });
}

struct BlockParams {
  mx::Dtype out;
  bool operator==(const BlockParams&) const = default;
};

class DequantizeBlocks : public CpuPrimitiveWith<BlockParams> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    // The blocks are bytes, which dispatch does not pack: dequantize_blocks made them contiguous.
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      const int64_t N = out.shape(0), superblocks = out.shape(1) / QK_K;
      if (out.dtype() == mx::float32) q6_k_rows(in[0].data<uint8_t>(), out.data<float>(), N, superblocks);
      else q6_k_rows(in[0].data<uint8_t>(), out.data<uint16_t>(), N, superblocks);
    }, 0);
  }
  const char* name() const override { return "DequantizeBlocks"; }
};

class BlockMatvec : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    // x is packed by dispatch (the first input); the blocks were made contiguous by block_matvec.
    run(in, out, [](std::vector<mx::array>& in, mx::array& out) {
      const int64_t N = in[1].shape(0), superblocks = in[1].shape(1) / Q6_K_BYTES;
      q6_k_matvec_rows(in[0].data<float>(), in[1].data<uint8_t>(), out.data<float>(),
                       int(in[0].size() / (superblocks * QK_K)), N, superblocks);
    }, 1);
  }
  // Frozen weights (QLoRA): only x has a gradient, through the dense weight.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    for (int arg : argnums)
      if (arg != 0) throw std::invalid_argument("BlockMatvec: no gradient for the blocks");
    return {mx::matmul(cotangents[0], dequantize_blocks(primals[1], "Q6_K", mx::float32), stream())};
  }
  const char* name() const override { return "BlockMatvec"; }
};

void check_blocks(const mx::array& blocks, const std::string& type) {
  if (type != "Q6_K" || blocks.dtype() != mx::uint8 || blocks.ndim() != 2 || blocks.shape(1) % Q6_K_BYTES != 0)
    throw std::invalid_argument("blocks must be a 2-D uint8 array of whole Q6_K superblocks (210 bytes), "
                                "type \"Q6_K\"");
}

}  // namespace

// blocks uint8 [N, K / 256 * 210] of Q6_K superblocks -> [N, K] float32 (or bfloat16, rounded to nearest even)
mx::array dequantize_blocks(const mx::array& blocks, const std::string& type, mx::Dtype dtype) {
  check_blocks(blocks, type);
  if (dtype != mx::float32 && dtype != mx::bfloat16) throw std::invalid_argument("dtype must be float32 or bfloat16");
  return mx::array({blocks.shape(0), blocks.shape(1) / Q6_K_BYTES * QK_K}, dtype,
                   std::make_shared<DequantizeBlocks>(cpu_stream(), BlockParams{dtype}),
                   {mx::contiguous(blocks, false, cpu_stream())});
}

// x [..., K] @ dense(blocks)^T -> [..., N], float32, for a few rows of x
mx::array block_matvec(const mx::array& x, const mx::array& blocks, const std::string& type) {
  check_float32(x, "x");
  check_blocks(blocks, type);
  if (x.ndim() < 1 || x.shape(-1) != blocks.shape(1) / Q6_K_BYTES * QK_K)
    throw std::invalid_argument("block_matvec: x does not fit the blocks");
  return mx::array(with_last(x.shape(), blocks.shape(0)), mx::float32, std::make_shared<BlockMatvec>(cpu_stream()),
                   {x, mx::contiguous(blocks, false, cpu_stream())});
}

}  // namespace cpu_kernels
