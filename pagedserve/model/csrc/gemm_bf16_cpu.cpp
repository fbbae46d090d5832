// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W in bfloat16, for CPUs with AVX512_BF16 (AMD Zen 4,
// Intel Cooper Lake / Sapphire Rapids): `--dtype bfloat16` on CPU.
//
// x stays float32 in the model (norms, attention, residuals); only the GEMM reads it as bf16:
// each call rounds x once (round-to-nearest-even, as torch does) into pairs of bf16, and
// VDPBF16PS multiplies a pair of x by a pair of W per lane, accumulating in float32. Per
// instruction that is twice the multiply-adds of an fp32 FMA, and the weights are half the bytes,
// which is what decode steps (streaming every weight once per step) are bound by.
//
// Layout: W as [N/16][K2][16][2] (K2 = ceil(K/2), zero-padded): for panel j and k-pair p, one
// 64-byte row holds columns 16j..16j+15, each with W[., 2p] and W[., 2p+1] side by side — one zmm
// of __m512bh. A 12x32 register tile (two panels, 24 float32 accumulators) walks the k-pairs,
// the shape of the fp32 AVX-512 tile (gemm_tile512.h).
//
// Compiled into the x86-64-v4 build only, with AVX512_BF16 enabled for these functions alone;
// packed_linear_bf16_supported() checks the CPU at run time before anything calls them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "parallel.h"
#include "prefetch.h"
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) && defined(__GNUC__)
#define PAGEDSERVE_BF16_GEMM 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#include "gemm_tile_bf16.h"

namespace bf16gemm {
constexpr int64_t NR = 16;    // output columns per panel
constexpr int64_t MR = 12;    // rows of x per register tile
constexpr int64_t KCP = 1024;  // k-pairs per slice for long K (1024 x 16 x 4 bytes = 64 KB of panel)


template <int NP>
static inline void tile_rows(int64_t rows, const uint32_t* A, int64_t lda, const uint16_t* Bp, int64_t pstride, float* C,
                             int64_t ldc, int64_t kp, bool first, const float* bias, int64_t ahead = 0) {
  switch (rows) {
    case 12: bf16tile::tile<12, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 11: bf16tile::tile<11, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 10: bf16tile::tile<10, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 9: bf16tile::tile<9, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 8: bf16tile::tile<8, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 7: bf16tile::tile<7, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 6: bf16tile::tile<6, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 5: bf16tile::tile<5, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 4: bf16tile::tile<4, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 3: bf16tile::tile<3, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    case 2: bf16tile::tile<2, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
    default: bf16tile::tile<1, NP>(A, lda, Bp, pstride, C, ldc, kp, first, bias, ahead); break;
  }
}

// Panels [j0, j1) (pairs kept whole) for all M rows; each panel pair is read from memory once and
// reused from L2 by every row tile.
static void panels(const uint32_t* A, int64_t lda, const uint16_t* Wp, const float* bias, float* C, int64_t ldc,
                   int64_t M, int64_t K2, int64_t j0, int64_t j1) {
  const int64_t kcp_max = K2 <= 3 * KCP / 2 ? K2 : KCP;
  const int64_t pstride = K2 * 2 * NR;  // bf16 elements per panel
  // the first row tile streams each pair: a few KiB ahead into L2 (prefetch.h); up to 64 rows,
  // where it measured faster (from 256 rows, prefill, it is compute-bound and measured nothing)
  const int64_t ahead = M <= 64 ? pagedserve::gemm_prefetch_bytes().load(std::memory_order_relaxed) : 0;
  for (int64_t j = j0; j < j1; j += 2) {
    const bool pair = j + 1 < j1;
    const float* b = bias ? bias + j * NR : nullptr;
    for (int64_t pc = 0; pc < K2; pc += kcp_max) {
      const int64_t kp = std::min(kcp_max, K2 - pc);
      const uint16_t* bp = Wp + j * pstride + pc * 2 * NR;
      for (int64_t ir = 0; ir < M; ir += MR) {
        const int64_t rows = std::min(MR, M - ir);
        if (pair)
          tile_rows<2>(rows, A + ir * lda + pc, lda, bp, pstride, C + ir * ldc + j * NR, ldc, kp, pc == 0, b, ir == 0 ? ahead : 0);
        else
          tile_rows<1>(rows, A + ir * lda + pc, lda, bp, pstride, C + ir * ldc + j * NR, ldc, kp, pc == 0, b, ir == 0 ? ahead : 0);
      }
    }
  }
}

// x rows [r0, r1) -> bf16 pairs (RNE), zero-padded to K2 pairs.
static void round_rows(const float* x, int64_t ldx, int64_t K, uint16_t* out, int64_t K2, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* src = x + r * ldx;
    uint16_t* dst = out + r * 2 * K2;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
      _mm512_storeu_si512(dst + k, (__m512i)v);
    }
    for (; k < K; ++k) dst[k] = c10::BFloat16(src[k]).x;
    if (K & 1) dst[K] = 0;
  }
}

// x float32 [M, K] -> bf16 [M, 2 * K2] in k-pairs (K2 = ceil(K/2), zero-padded), what the bf16 tile
// reads as A; shared by the packed bf16 GEMM and the quantized GEMM's bf16 path.
static torch::Tensor round_input(const torch::Tensor& x, int64_t K2) {
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  auto xb = torch::empty({M, 2 * K2}, x.options().dtype(torch::kBFloat16));
  uint16_t* xbp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  pagedserve::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { round_rows(xp, ldx, K, xbp, K2, r0, r1); });
  return xb;
}
}  // namespace bf16gemm
#pragma GCC pop_options
#endif

bool packed_linear_bf16_supported() {
#if defined(PAGEDSERVE_BF16_GEMM)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// W[N, K] float32 (or bf16) -> bf16 [N/16, ceil(K/2), 32], the layout above.
torch::Tensor pack_linear_weight_bf16(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "a 2-D weight");
  constexpr int64_t NR = 16;
  const int64_t N = w.size(0), K = w.size(1), K2 = (K + 1) / 2;
  TORCH_CHECK(N % NR == 0, "out_features must be a multiple of ", NR, ", got ", N);
  auto wb = w.to(torch::kBFloat16).contiguous();  // round-to-nearest-even, as torch's .bfloat16()
  auto out = torch::zeros({N / NR, K2, 2 * NR}, wb.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wb.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / NR, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < NR; ++c) dst[(j * K2 + k / 2) * 2 * NR + c * 2 + (k & 1)] = src[(j * NR + c) * K + k];
  });
  return out;
}

// y = x @ W^T (+ bias) for packed_linear (gemm_cpu.cpp), which has checked the shapes and the bias
// and allocated y.
void packed_linear_bf16(const torch::Tensor& x, const torch::Tensor& wp, const float* b, torch::Tensor& y) {
  const int64_t M = x.size(0), K2 = wp.size(1), P = wp.size(0), N = P * 16;
#if defined(PAGEDSERVE_BF16_GEMM)
  TORCH_CHECK(packed_linear_bf16_supported(), "this CPU has no AVX512_BF16");
  const auto xb = bf16gemm::round_input(x, K2);
  const uint32_t* A = reinterpret_cast<const uint32_t*>(xb.data_ptr<at::BFloat16>());
  const uint16_t* wpp = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  pagedserve::parallel_for(0, (P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    bf16gemm::panels(A, K2, wpp, b, yp, N, M, K2, 2 * q0, std::min(P, 2 * q1));
  });
#else
  (void)M, (void)K2, (void)N, (void)b;
  TORCH_CHECK(false, "the bf16 packed GEMM needs the x86-64-v4 kernel build and a CPU with AVX512_BF16");
#endif
}
