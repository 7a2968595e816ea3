// GGUF's Q6_K superblocks held as they are (formats/gguf/kquants.py): their dense matrix for the
// products of a layer kept in its original blocks. Each 16 values have an int8 scale of their own,
// which MLX's groups of 32 cannot hold, so no MLX quantization carries them exactly.
//
// A superblock is 210 bytes for 256 values: ql (128 bytes, the codes' low nibbles), qh (64, their
// top two bits), 16 int8 scales sc, and a float16 d. Value v of the superblock is
// (d * sc[v / 16]) * (q - 32), two float32 roundings, as llama.cpp and the gguf package compute it.
// Per half h of 128 values and l < 32: ql[64h + l] holds values l (low nibble) and l + 64 (high),
// ql[64h + 32 + l] values l + 32 and l + 96; qh[32h + l] their top bits, two each, in that order.

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// One superblock's 256 values. The loop over l has no dependence between iterations: the compiler
// vectorises it.
template <typename Out>
void q6_k_superblock(const uint8_t* block, Out* out) {
  const uint8_t *ql = block, *qh = block + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
  mx::float16_t d;
  std::memcpy(&d, block + 208, 2);
  float step[16];  // d * sc, rounded once, as the references round it
  for (int s = 0; s < 16; s++) step[s] = float(d) * float(sc[s]);
  for (int h = 0; h < 2; h++, ql += 64, qh += 32, out += 128) {
#pragma omp simd
    for (int l = 0; l < 32; l++) {
      const int q0 = (ql[l] & 15) | ((qh[l] & 3) << 4), q1 = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
      const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), q3 = (ql[l + 32] >> 4) | ((qh[l] >> 6) << 4);
      const float* st = step + 8 * h + l / 16;
      out[l] = stored<Out>(st[0] * float(q0 - 32));
      out[l + 32] = stored<Out>(st[2] * float(q1 - 32));
      out[l + 64] = stored<Out>(st[4] * float(q2 - 32));
      out[l + 96] = stored<Out>(st[6] * float(q3 - 32));
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

}  // namespace

// blocks uint8 [N, K / 256 * 210] of Q6_K superblocks -> [N, K] float32 (or bfloat16, rounded to nearest even)
mx::array dequantize_blocks(const mx::array& blocks, const std::string& type, mx::Dtype dtype) {
  if (type != "Q6_K" || blocks.dtype() != mx::uint8 || blocks.ndim() != 2 || blocks.shape(1) % Q6_K_BYTES != 0 ||
      (dtype != mx::float32 && dtype != mx::bfloat16))
    throw std::invalid_argument("dequantize_blocks: blocks must be a 2-D uint8 array of whole Q6_K superblocks "
                                "(210 bytes), type \"Q6_K\", dtype float32 or bfloat16");
  return mx::array({blocks.shape(0), blocks.shape(1) / Q6_K_BYTES * QK_K}, dtype,
                   std::make_shared<DequantizeBlocks>(cpu_stream(), BlockParams{dtype}),
                   {mx::contiguous(blocks, false, cpu_stream())});
}

}  // namespace cpu_kernels
