// The Python module: CPU kernels MLX lacks on x86, as lazy MLX primitives. Decoding,
// QLoRA training and the loss are bound by operations that MLX's CPU backend runs
// single-threaded, one value at a time, or through a BLAS call made for large
// matrices; these run them threaded and vectorised.
//
// One file per kernel family, each with its loops, its MLX primitives and its
// operations: matvec.cpp (float32 and float16 weights), quantized.cpp, kquants.cpp (GGUF's Q6_K),
// bf16_matmul.cpp (AMX), cross_entropy.cpp, activations.cpp, causal_softmax.cpp, decoding.cpp
// (norm, RoPE, attention). Shared: threads.h (the thread pool), simd.h (dot, exp, softmax rows),
// primitive.h (the MLX plumbing), ops.h (what this file binds).

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ops.h"

// The module's name is the file's name: _cpu_kernels, or _cpu_kernels_portable for the
// build that tests the code paths without AVX-512 (see CMakeLists.txt).
#ifndef MLX_LORA_MODULE_NAME
#define MLX_LORA_MODULE_NAME _cpu_kernels
#endif

// The portable build exists to compile the #else branches; with AVX-512 on, it would
// silently test the same code as the native one.
#if defined(MLX_LORA_PORTABLE) && defined(__AVX512F__)
#error "MLX_LORA_PORTABLE builds must not enable AVX-512"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using namespace cpu_kernels;

NB_MODULE(MLX_LORA_MODULE_NAME, m) {
  // ops.py refuses a build of another version (one left over from before a git pull, say):
  // raise it whenever a function's signature or meaning changes.
  m.attr("API_VERSION") = 10;
  m.doc() = "CPU kernels for MLX: float32 and quantized matvec, dequantize (GGUF's Q6_K blocks too), float16 widening, bfloat16 products on AMX, cross-entropy, the activations (gates, GELU, soft cap), causal softmax, and the norm, RoPE and attention of decoding.";
  m.def("matvec", &matvec, "x"_a, "w"_a, "x [..., K] @ w [N, K].T for a few rows of x (float32; w float32 or float16).");
  m.def("matvecs", &matvecs, "x"_a, "w"_a,
        "[x @ w.T for w in w] for a few rows of x, in one pass over all the weights (float32).");
  m.def("quantized_matvec", &quantized_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "x [..., K] @ dequantize(w).T for a few rows of x (float32 x, scales and biases).");
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "dtype"_a = mlx::core::float32,
        "The float32 (or bfloat16) matrix of MLX affine-quantized weights.");
  m.def("dequantize_blocks", &dequantize_blocks, "blocks"_a, "type"_a, "dtype"_a = mlx::core::float32,
        "The float32 (or bfloat16) matrix [N, K] of GGUF blocks uint8 [N, K / 256 * 210] (type \"Q6_K\"), exactly.");
  m.def("block_matvec", &block_matvec, "x"_a, "blocks"_a, "type"_a,
        "x [..., K] @ dequantize_blocks(blocks).T for a few rows of x (float32), straight from the blocks.");
  m.def("to_float32", &to_float32, "x"_a, "float16 x as float32 (exact), on every thread.");
  m.def("bf16_products", &bf16_products,
        "Whether bf16_matmul runs here: built with AMX, and the kernel lends this process its tiles.");
  m.def("bf16_matmul", &bf16_matmul, "a"_a, "b"_a, "transposed"_a,
        "a [..., K] @ b.T (b [N, K]) or a @ b (b [K, N]), both rounded to bfloat16, summed in float32 on AMX tiles.");
  m.def("cross_entropy", &cross_entropy, "logits"_a, "targets"_a,
        "logsumexp(logits) - logits[target] along the last axis (float32 logits).");
  m.def("gate", &gate, "a"_a, "b"_a, "gelu"_a, "silu(a) * b, or gelu(a) * b with the tanh GELU (float32).");
  m.def("gate_halves", &gate_halves, "ab"_a, "gelu"_a,
        "gate(ab[..., :C], ab[..., C:], gelu) of the halves of ab [..., 2C], its gradient in one array (float32).");
  m.def("gelu", &gelu, "a"_a, "gelu(a), the tanh GELU (float32).");
  m.def("soft_cap", &soft_cap, "x"_a, "cap"_a, "scale"_a = 1.0f, "cap * tanh(scale * x / cap) (float32).");
  m.def("causal_softmax", &causal_softmax, "x"_a, "scale"_a, "window"_a = 0, "cap"_a = 0.0f,
        "softmax(scale * x) along the last axis of x [..., T, S] under MLX's causal mask, within the last "
        "`window` keys if window > 0, of cap * tanh(scale * x / cap) if cap > 0 (float32).");
  m.def("rms_norm", &rms_norm, "x"_a, "w"_a, "eps"_a, "mx.fast.rms_norm for a few rows (float32).");
  m.def("rope", &rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "mx.fast.rope for a few positions (float32, integer offset).");
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "mx.fast.scaled_dot_product_attention without a mask, for a few queries (float32).");
}
