// bfloat16 products on AMX tiles: a @ b^T (or a @ b) with both operands rounded to
// bfloat16 (to nearest, ties to even) and float32 sums: the numerics of PyTorch's CPU
// autocast. An AMX unit multiplies 16x32 by 32x16 bfloat16 tiles in 16 cycles, about
// 16 times the float32 multiply-adds of AVX-512 on one core; MLX's own bfloat16 matmul
// is a scalar loop on x86.
//
// Layouts, both zero-padded to multiples of 32 and cut into 1 KB tiles that load in one
// piece. A: [Mp/16][Kp/32] tiles of [16 rows][32 values]. B: [Np/16][Kp/32] tiles of
// AMX's "VNNI" layout, [16 pairs][16 columns][2]: tile row p holds, for each of 16
// output columns, the two values of B at reductions 2p and 2p+1. C is computed in 32x32 blocks, 2x2 accumulator tiles (0-3)
// fed by two A tiles (4, 5) and two B tiles (6, 7) per step of 32 along K.

#include <cstring>
#include <type_traits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "ops.h"
#include "primitive.h"
#include "simd.h"
#include "threads.h"

// Every CPU with AMX has AVX-512's bfloat16 conversion, which the packing uses.
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__linux__)
#define MLX_LORA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace cpu_kernels {
namespace {

#if defined(MLX_LORA_AMX)
constexpr int TILE_ROWS = 16;
constexpr int K_STEP = 32;  // bfloat16 values in a tile row: one step along K
constexpr int BLOCK = 32;   // C's blocks: 2x2 tiles of 16x16
constexpr int TILE_VALUES = TILE_ROWS * K_STEP;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Scratch memory from MLX's allocator, whose cache hands the same pages back at the next
// call already faulted in: a fresh vector of some MB took longer to fault in than to fill.
template <typename T>
struct Scratch {
  mx::allocator::Data data;
  explicit Scratch(int64_t n) : data(mx::allocator::malloc(size_t(n) * sizeof(T))) {}
  T* get() { return static_cast<T*>(data.buffer().raw_ptr()); }
};

// A value of B as bfloat16 bits: float32 and float16 rounded, bfloat16 bits as they are.
inline uint16_t bf16_of(float v) { return to_bf16(v); }
inline uint16_t bf16_of(mx::float16_t v) { return to_bf16(static_cast<float>(v)); }
inline uint16_t bf16_of(uint16_t v) { return v; }

// Sixteen values from `src` as bfloat16 bits.
inline void bf16_row16(const float* src, uint16_t* out) {
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src)));
}
inline void bf16_row16(const mx::float16_t* src, uint16_t* out) {
  const __m512 widened = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)src));  // exact
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(widened));
}
inline void bf16_row16(const uint16_t* src, uint16_t* out) { std::memcpy(out, src, 32); }

// A [M, K] (float32) -> bfloat16 tiles [Mp/16][Kp/32] of [16 rows][32 values], zeros
// past M and K: each tile 1 KB in one piece, as B's, for the tile loads.
void pack_a(const float* a, int64_t M, int64_t K, uint16_t* ap, int64_t Mp, int64_t Kp) {
  const int64_t k_tiles = Kp / K_STEP;
  parallel_for(Mp, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; m++) {
      uint16_t* tiles = ap + (m / TILE_ROWS) * k_tiles * TILE_VALUES + (m % TILE_ROWS) * K_STEP;
      for (int64_t kt = 0; kt < k_tiles; kt++) {
        uint16_t* row = tiles + kt * TILE_VALUES;
        const int64_t k0 = kt * K_STEP;
        if (m < M && k0 + K_STEP <= K) {
          bf16_row16(a + m * K + k0, row);
          bf16_row16(a + m * K + k0 + 16, row + 16);
        } else {
          for (int i = 0; i < K_STEP; i++) row[i] = m < M && k0 + i < K ? to_bf16(a[m * K + k0 + i]) : uint16_t(0);
        }
      }
    }
  });
}

// Tile (nt, kt) of B from b [N, K], transposed: row n's 32 values from k0 are its 16
// pairs, and the tile is the 16x16 transpose of those pairs.
template <typename T>
void tile_from_rows(const T* b, int64_t N, int64_t K, int64_t n0, int64_t k0, uint32_t* tile) {
  alignas(64) uint32_t pairs[TILE_ROWS][TILE_ROWS];  // [column][pair]
  for (int c = 0; c < TILE_ROWS; c++) {
    uint16_t* row = reinterpret_cast<uint16_t*>(pairs[c]);
    const int64_t n = n0 + c;
    if (n < N && k0 + K_STEP <= K) {
      bf16_row16(b + n * K + k0, row);
      bf16_row16(b + n * K + k0 + 16, row + 16);
    } else {
      for (int i = 0; i < K_STEP; i++) row[i] = n < N && k0 + i < K ? bf16_of(b[n * K + k0 + i]) : uint16_t(0);
    }
  }
  for (int p = 0; p < TILE_ROWS; p++)
    for (int c = 0; c < TILE_ROWS; c++) tile[p * TILE_ROWS + c] = pairs[c][p];
}

// Tile (nt, kt) of B from b [K, N]: tile row p is rows k0+2p and k0+2p+1 of b, 16
// columns from n0, interleaved value by value.
template <typename T>
void tile_from_columns(const T* b, int64_t N, int64_t K, int64_t n0, int64_t k0, uint32_t* tile) {
  const bool inside = n0 + TILE_ROWS <= N && k0 + K_STEP <= K;
  for (int p = 0; p < TILE_ROWS; p++) {
    const int64_t k = k0 + 2 * p;
    if (inside) {
      alignas(64) uint16_t two[2][TILE_ROWS];
      bf16_row16(b + k * N + n0, two[0]);
      bf16_row16(b + (k + 1) * N + n0, two[1]);
      const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                  23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      _mm512_storeu_si512(tile + p * TILE_ROWS, _mm512_permutexvar_epi16(interleave, _mm512_load_si512(two)));
      continue;
    }
    for (int c = 0; c < TILE_ROWS; c++) {
      const int64_t n = n0 + c;
      const uint32_t lo = n < N && k < K ? bf16_of(b[k * N + n]) : 0;
      const uint32_t hi = n < N && k + 1 < K ? bf16_of(b[(k + 1) * N + n]) : 0;
      tile[p * TILE_ROWS + c] = lo | hi << 16;
    }
  }
}

// B's tiles, from b [N, K] (transposed: C = A b^T) or b [K, N] (C = A b), float32,
// float16 or bfloat16 bits; zeros past N and K. The threads split b's rows, so that each reads its
// part of b in order.
template <typename T>
void pack_b(const T* b, bool transposed, int64_t N, int64_t K, uint16_t* bp, int64_t Np, int64_t Kp) {
  const int64_t k_tiles = Kp / K_STEP, n_tiles = Np / TILE_ROWS;
  auto tile = [&](int64_t nt, int64_t kt) {
    return reinterpret_cast<uint32_t*>(bp + (nt * k_tiles + kt) * TILE_VALUES);
  };
  if (transposed) {
    parallel_for(n_tiles, [&](int64_t first, int64_t last) {
      for (int64_t nt = first; nt < last; nt++)
        for (int64_t kt = 0; kt < k_tiles; kt++) tile_from_rows(b, N, K, nt * TILE_ROWS, kt * K_STEP, tile(nt, kt));
    });
  } else {
    parallel_for(k_tiles, [&](int64_t first, int64_t last) {
      for (int64_t kt = first; kt < last; kt++)
        for (int64_t nt = 0; nt < n_tiles; nt++) tile_from_columns(b, N, K, nt * TILE_ROWS, kt * K_STEP, tile(nt, kt));
    });
  }
}

// Linux hands out AMX's tile registers to processes that ask (arch_prctl), once.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes: a float32 accumulator 16x16, or bfloat16 16x32.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; t++) {
    config.rows[t] = TILE_ROWS;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Blocking for the caches: A is taken K_CHUNK values wide and about A_CHUNK_BYTES at a time
// (its rows stay in the core's L2 while the thread's B tiles pass), B one 32-column
// panel of the same K_CHUNK at a time (64 KB: L1 and L2). Past one K chunk, C's blocks
// are reloaded and summed into.
constexpr int64_t K_CHUNK = 1024;
constexpr int64_t A_CHUNK_BYTES = 512 * 1024;

// Cp [Mp, Np] (ldc floats a row) = Ap [Mp, Kp] @ (B's tiles); the 32-column panels split
// between the threads, each panel's B tiles reused over a chunk of A's rows.
void tile_products(const uint16_t* ap, const uint16_t* bp, float* cp, int64_t ldc, int64_t Mp, int64_t Np,
                   int64_t Kp) {
  const int64_t k_tiles = Kp / K_STEP;
  const int64_t k_chunk = std::min(Kp, K_CHUNK);
  const int64_t m_chunk = std::max<int64_t>(BLOCK, A_CHUNK_BYTES / (2 * k_chunk) / BLOCK * BLOCK);
  parallel_for(Np / BLOCK, [&](int64_t first, int64_t last) {
    configure_tiles();
    for (int64_t k0 = 0; k0 < Kp; k0 += k_chunk) {
      const int64_t kt0 = k0 / K_STEP, kt1 = std::min(Kp, k0 + k_chunk) / K_STEP;
      for (int64_t m0 = 0; m0 < Mp; m0 += m_chunk)
        for (int64_t nb = first; nb < last; nb++) {
          const uint16_t* b0 = bp + (2 * nb) * k_tiles * TILE_VALUES;
          const uint16_t* b1 = b0 + k_tiles * TILE_VALUES;
          for (int64_t m = m0; m < std::min(Mp, m0 + m_chunk); m += BLOCK) {
            const uint16_t* a0 = ap + (m / TILE_ROWS) * k_tiles * TILE_VALUES;
            const uint16_t* a1 = a0 + k_tiles * TILE_VALUES;
            float* c = cp + m * ldc + nb * BLOCK;
            if (k0 == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c, ldc * 4);
              _tile_loadd(1, c + 16, ldc * 4);
              _tile_loadd(2, c + 16 * ldc, ldc * 4);
              _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
            }
            for (int64_t kt = kt0; kt < kt1; kt++) {
              // each product as soon as its tiles are in: about 4 % faster than all loads first
              _tile_loadd(4, a0 + kt * TILE_VALUES, 64);
              _tile_loadd(6, b0 + kt * TILE_VALUES, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_loadd(7, b1 + kt * TILE_VALUES, 64);
              _tile_dpbf16ps(1, 4, 7);
              _tile_loadd(5, a1 + kt * TILE_VALUES, 64);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, ldc * 4);
            _tile_stored(1, c + 16, ldc * 4);
            _tile_stored(2, c + 16 * ldc, ldc * 4);
            _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
          }
        }
    }
    _tile_release();  // no tile state for the kernel to save at every switch
  });
}

// C [M, N] = the products; into C itself when M and N are whole blocks, else through a
// padded Cp whose valid part is copied out.
void bf16_products_into(const uint16_t* ap, const uint16_t* bp, float* c, int64_t M, int64_t N, int64_t Mp,
                        int64_t Np, int64_t Kp) {
  if (M == Mp && N == Np) {
    tile_products(ap, bp, c, N, Mp, Np, Kp);
    return;
  }
  Scratch<float> cp(Mp * Np);
  tile_products(ap, bp, cp.get(), Np, Mp, Np, Kp);
  parallel_for(M, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; m++) std::memcpy(c + m * N, cp.get() + m * Np, N * 4);
  });
}
#endif

struct Orientation {
  bool transposed;  // C = A B^T (B [N, K]) rather than A B (B [K, N])
  bool operator==(const Orientation&) const = default;
};

class Bf16Matmul : public CpuPrimitiveWith<Orientation> {
 public:
  using CpuPrimitiveWith::CpuPrimitiveWith;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    run(in, out, [transposed = p_.transposed](std::vector<mx::array>& in, mx::array& out) {
#if defined(MLX_LORA_AMX)
      const auto& a = in[0];
      const auto& b = in[1];
      const int64_t K = a.shape(-1), N = out.shape(-1);
      if (K == 0) std::fill_n(out.data<float>(), out.size(), 0.0f);  // an empty sum
      if (K == 0 || out.size() == 0) return;
      const int64_t M = a.size() / K;
      const int64_t Mp = round_up(M, BLOCK), Np = round_up(N, BLOCK), Kp = round_up(K, K_STEP);
      Scratch<uint16_t> ap(Mp * Kp), bp(Np * Kp);
      pack_a(a.data<float>(), M, K, ap.get(), Mp, Kp);
      if (b.dtype() == mx::float32) pack_b(b.data<float>(), transposed, N, K, bp.get(), Np, Kp);
      else if (b.dtype() == mx::float16) pack_b(b.data<mx::float16_t>(), transposed, N, K, bp.get(), Np, Kp);
      else pack_b(b.data<uint16_t>(), transposed, N, K, bp.get(), Np, Kp);
      bf16_products_into(ap.get(), bp.get(), out.data<float>(), M, N, Mp, Np, Kp);
#else
      throw std::runtime_error("bf16_matmul: built without AMX");
#endif
    });
  }
  // d/da through the same kernel (B in the other orientation); d/db, which frozen
  // weights never ask for, in float32 by MLX.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto& a = primals[0];
    const auto& b = primals[1];
    const auto g = mx::astype(cotangents[0], mx::float32, stream());
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        grads.push_back(mx::array(a.shape(), mx::float32,
                                  std::make_shared<Bf16Matmul>(stream(), Orientation{!p_.transposed}), {g, b}));
        continue;
      }
      const int rows = a.shape(-1) > 0 ? int(a.size() / a.shape(-1)) : int(g.size() / std::max(g.shape(-1), 1));
      const auto a2 = mx::reshape(a, {rows, a.shape(-1)}, stream());
      const auto g2 = mx::reshape(g, {rows, g.shape(-1)}, stream());
      const auto db = p_.transposed ? mx::matmul(mx::transpose(g2, stream()), a2, stream())
                                    : mx::matmul(mx::transpose(a2, stream()), g2, stream());
      grads.push_back(mx::astype(db, b.dtype(), stream()));
    }
    return grads;
  }
  const char* name() const override { return "Bf16Matmul"; }
};

}  // namespace

bool bf16_products() {
#if defined(MLX_LORA_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// a [..., K] (float32) @ b^T with b [N, K], or @ b with b [K, N] (float32, float16 or bfloat16):
// float32 [..., N], the operands rounded to bfloat16.
mx::array bf16_matmul(const mx::array& a, const mx::array& b, bool transposed) {
  check_float32(a, "a");
  if (b.dtype() != mx::float32 && b.dtype() != mx::float16 && b.dtype() != mx::bfloat16)
    throw std::invalid_argument("bf16_matmul: b must be float32, float16 or bfloat16");
  if (a.ndim() < 1 || b.ndim() != 2) throw std::invalid_argument("bf16_matmul: a must be [..., K] and b 2-D");
  const int K = a.shape(-1), N = transposed ? b.shape(0) : b.shape(1);
  if ((transposed ? b.shape(1) : b.shape(0)) != K)
    throw std::invalid_argument("bf16_matmul: the inner dimensions of a and b differ");
  if (!bf16_products()) throw std::runtime_error("bf16_matmul: this CPU (or kernel) offers no AMX bfloat16 tiles");
  return mx::array(with_last(a.shape(), N), mx::float32,
                   std::make_shared<Bf16Matmul>(cpu_stream(), Orientation{transposed}), {a, b});
}

}  // namespace cpu_kernels
