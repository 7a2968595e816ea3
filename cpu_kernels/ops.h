// The operations bindings.cpp exposes to Python, one kernel family per file. Each
// checks its arguments (std::invalid_argument: ValueError) and returns a lazy array.
#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"

namespace cpu_kernels {

namespace mx = mlx::core;

// matvec.cpp: float32 or float16 weights
std::vector<mx::array> matvecs(const mx::array& x, const std::vector<mx::array>& w);
mx::array matvec(const mx::array& x, const mx::array& w);
mx::array to_float32(const mx::array& x);

// quantized.cpp: MLX's affine-quantized weights
mx::array quantized_matvec(const mx::array& x, const mx::array& wq, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits);
mx::array dequantize(const mx::array& wq, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, mx::Dtype dtype);

// kquants.cpp: GGUF's Q6_K superblocks, held as they are
mx::array dequantize_blocks(const mx::array& blocks, const std::string& type, mx::Dtype dtype);
mx::array block_matvec(const mx::array& x, const mx::array& blocks, const std::string& type);

// bf16_matmul.cpp: bfloat16 products on AMX tiles, float32 sums
bool bf16_products();
mx::array bf16_matmul(const mx::array& a, const mx::array& b, bool transposed);

// cross_entropy.cpp
mx::array cross_entropy(const mx::array& logits, const mx::array& targets);

// activations.cpp
mx::array gate(const mx::array& a, const mx::array& b, bool gelu);
mx::array gate_halves(const mx::array& ab, bool gelu);
mx::array gelu(const mx::array& a);
mx::array soft_cap(const mx::array& x, float cap, float scale);

// causal_softmax.cpp
mx::array causal_softmax(const mx::array& x, float scale, int window = 0, float cap = 0);

// decoding.cpp: the norm, RoPE and attention of a few rows
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps);
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset);
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale);

}  // namespace cpu_kernels
