// The AVX512_BF16 register tile of the bf16 packed GEMM (gemm_bf16_cpu.cpp), also prefill
// attention's in bf16 math (prefill_attention_cpu.cpp).
//
// C[0:R, 0:16*NP] = (first: bias, else C) + pairs A[0:R, 0:kp] . the same kp pair-rows of NP
// panels. A holds bf16 pairs as uint32 (lda pairs per row); a panel's pair-row is 16 uint32 = 32
// bf16 (columns 16 wide, each with its two k values side by side: one zmm of __m512bh); panels
// `pstride` bf16 apart. VDPBF16PS multiplies a broadcast pair of A by a pair-row, accumulating in
// float32: the 12x32 tile is 24 zmm accumulators, the shape of the float32 AVX-512 tile.
//
// Callers compile it with AVX512_BF16 enabled (a GCC target pragma around the include) and check
// the CPU at run time first.
#pragma once
#include <cstdint>
#include <immintrin.h>

namespace bf16tile {
constexpr int64_t NR = 16;  // columns per panel

#define BF_ROW(r)                                                                       \
  if constexpr (R > r) {                                                                \
    const __m512bh a = (__m512bh)_mm512_set1_epi32(A[r * lda + p]);                     \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, a, b0);                                         \
    if constexpr (NP > 1) c##r##1 = _mm512_dpbf16_ps(c##r##1, a, b1);                   \
  }
#define BF_OUT(r)                                                                       \
  if constexpr (R > r) {                                                                \
    if (add) c##r##0 = _mm512_add_ps(c##r##0, _mm512_loadu_ps(add + r * add_ld));      \
    _mm512_storeu_ps(C + r * ldc, c##r##0);                                             \
    if constexpr (NP > 1) {                                                             \
      if (add) c##r##1 = _mm512_add_ps(c##r##1, _mm512_loadu_ps(add + r * add_ld + 16)); \
      _mm512_storeu_ps(C + r * ldc + 16, c##r##1);                                      \
    }                                                                                   \
  }

template <int R, int NP>
static inline void tile(const uint32_t* __restrict A, int64_t lda, const uint16_t* __restrict Bp, int64_t pstride,
                        float* __restrict C, int64_t ldc, int64_t kp, bool first, const float* bias,
                        int64_t ahead = 0) {
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  __m512 c60 = z, c61 = z, c70 = z, c71 = z, c80 = z, c81 = z, c90 = z, c91 = z;
  __m512 c100 = z, c101 = z, c110 = z, c111 = z;
  const uint16_t* __restrict B1 = Bp + pstride;
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + p * 2 * NR);
    const __m512bh b1 = NP > 1 ? (__m512bh)_mm512_loadu_si512(B1 + p * 2 * NR) : (__m512bh)_mm512_setzero_si512();
    if (ahead) {  // the streamed panels `ahead` bytes on, into L2 (prefetch.h)
      _mm_prefetch(reinterpret_cast<const char*>(Bp + p * 2 * NR) + ahead, _MM_HINT_T1);
      if constexpr (NP > 1) _mm_prefetch(reinterpret_cast<const char*>(B1 + p * 2 * NR) + ahead, _MM_HINT_T1);
    }
    BF_ROW(0) BF_ROW(1) BF_ROW(2) BF_ROW(3) BF_ROW(4) BF_ROW(5)
    BF_ROW(6) BF_ROW(7) BF_ROW(8) BF_ROW(9) BF_ROW(10) BF_ROW(11)
  }
  const float* add = first ? bias : C;
  const int64_t add_ld = first ? 0 : ldc;
  BF_OUT(0) BF_OUT(1) BF_OUT(2) BF_OUT(3) BF_OUT(4) BF_OUT(5)
  BF_OUT(6) BF_OUT(7) BF_OUT(8) BF_OUT(9) BF_OUT(10) BF_OUT(11)
}
#undef BF_ROW
#undef BF_OUT

}  // namespace bf16tile
