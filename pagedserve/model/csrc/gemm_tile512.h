// The AVX-512 register tile of the packed GEMM (gemm_cpu.cpp), used where the CPU has AVX-512F
// (Intel Xeon since Skylake-SP, AMD Zen 4): twice the FMA width of the AVX2 tile in gemm_tile.h.
//
// C[0:R, 0:16*NP] (+)= A[0:R, 0:kc] @ the same kc rows of NP adjacent weight panels, each panel
// [K][16] (one 64-byte row per k, exactly one zmm; rows `ldb` floats apart, 16 in a packed
// weight), panels `pstride` floats apart. The weights keep the AVX2 layout, so one packed copy
// serves both tiles; two panels side by side make the 12x32 tile (24 zmm accumulators of 32,
// BLIS's Skylake shape) that keeps both FMA ports busy. Prefill attention uses it too.
#pragma once
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

#define PS5_ROW(r)                                         \
  if constexpr (R > r) {                                   \
    const __m512 a = _mm512_set1_ps(A[r * lda + k]);       \
    c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);             \
    if constexpr (NP > 1) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1); \
  }
#define PS5_OUT(r)                                                                 \
  if constexpr (R > r) {                                                           \
    if (add) c##r##0 = _mm512_add_ps(c##r##0, _mm512_loadu_ps(add + r * add_ld));  \
    _mm512_storeu_ps(C + r * ldc, c##r##0);                                        \
    if constexpr (NP > 1) {                                                        \
      if (add) c##r##1 = _mm512_add_ps(c##r##1, _mm512_loadu_ps(add + r * add_ld + 16)); \
      _mm512_storeu_ps(C + r * ldc + 16, c##r##1);                                 \
    }                                                                              \
  }

// Accumulators are named variables starting from zero, as in the AVX2 tile: GCC keeps an array
// of them on the stack. `first` adds the bias (or nothing) instead of C.
template <int R, int NP>
static inline void tile512(const float* __restrict A, int64_t lda, const float* __restrict Bp, int64_t ldb,
                           int64_t pstride, float* __restrict C, int64_t ldc, int64_t kc, bool first, const float* bias,
                           const float* pf = nullptr, int64_t pf_every = 1, int64_t ahead = 0) {
  static_assert(R >= 1 && R <= 12 && (NP == 1 || NP == 2), "12 rows x 2 panels at most");
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  __m512 c60 = z, c61 = z, c70 = z, c71 = z, c80 = z, c81 = z, c90 = z, c91 = z;
  __m512 c100 = z, c101 = z, c110 = z, c111 = z;
  const float* __restrict B1 = Bp + pstride;
  int64_t pf_count = pf_every;
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(Bp + k * ldb);
    const __m512 b1 = NP > 1 ? _mm512_loadu_ps(B1 + k * ldb) : z;
    if (pf && --pf_count == 0) {  // one row of the next panel pair every pf_every steps of k
      pf_count = pf_every;
      _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + pstride), _MM_HINT_T0);
      pf += ldb;
    }
    if (ahead) {  // the streamed panels `ahead` bytes on, into L2 (prefetch.h)
      _mm_prefetch(reinterpret_cast<const char*>(Bp + k * ldb) + ahead, _MM_HINT_T1);
      if constexpr (NP > 1) _mm_prefetch(reinterpret_cast<const char*>(B1 + k * ldb) + ahead, _MM_HINT_T1);
    }
    PS5_ROW(0) PS5_ROW(1) PS5_ROW(2) PS5_ROW(3) PS5_ROW(4) PS5_ROW(5)
    PS5_ROW(6) PS5_ROW(7) PS5_ROW(8) PS5_ROW(9) PS5_ROW(10) PS5_ROW(11)
  }
  const float* add = first ? bias : C;
  const int64_t add_ld = first ? 0 : ldc;
  PS5_OUT(0) PS5_OUT(1) PS5_OUT(2) PS5_OUT(3) PS5_OUT(4) PS5_OUT(5)
  PS5_OUT(6) PS5_OUT(7) PS5_OUT(8) PS5_OUT(9) PS5_OUT(10) PS5_OUT(11)
}
#undef PS5_ROW
#undef PS5_OUT

template <int NP>
static inline void tile512_rows(int64_t rows, const float* A, int64_t lda, const float* Bp, int64_t ldb, int64_t pstride, float* C,
                                int64_t ldc, int64_t kc, bool first, const float* bias, const float* pf, int64_t pf_every = 1,
                                int64_t ahead = 0) {
  switch (rows) {
    case 12: tile512<12, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 11: tile512<11, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 10: tile512<10, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 9: tile512<9, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 8: tile512<8, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 7: tile512<7, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 6: tile512<6, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 5: tile512<5, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 4: tile512<4, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 3: tile512<3, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    case 2: tile512<2, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
    default: tile512<1, NP>(A, lda, Bp, ldb, pstride, C, ldc, kc, first, bias, pf, pf_every, ahead); break;
  }
}
#endif
