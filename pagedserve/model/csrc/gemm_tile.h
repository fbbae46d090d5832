// The 6x16 register tile of the packed GEMM (gemm_cpu.cpp), shared with prefill attention, whose
// scores (queries x a [D][16] key panel) and value sums (probabilities x 16 value columns) are the
// same small product.
#pragma once
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// C[0:R, 0:16] (+)= A[0:R, 0:kc] @ Bp[0:kc, 0:16], rows of Bp ldb floats apart (16 in a packed
// weight panel); `first` adds the bias (or nothing) instead of C. R is a template argument so
// the tile is fully unrolled. The accumulators are named
// variables and start from zero: with an array, or with C as the start value, GCC kept the tile
// on the stack (a store per FMA, half the speed).
#define PS_ROW(r)                                       \
  if constexpr (R > r) {                                \
    const __m256 a = _mm256_broadcast_ss(A + r * lda + k); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);          \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);          \
  }
#define PS_OUT(r)                                                          \
  if constexpr (R > r) {                                                   \
    if (add) {                                                             \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(add + r * add_ld));     \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(add + r * add_ld + 8)); \
    }                                                                      \
    _mm256_storeu_ps(C + r * ldc, c##r##0);                                \
    _mm256_storeu_ps(C + r * ldc + 8, c##r##1);                            \
  }

template <int R>
static inline void tile(const float* __restrict A, int64_t lda, const float* __restrict Bp, int64_t ldb,
                        float* __restrict C, int64_t ldc, int64_t kc, bool first, const float* bias) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  int64_t k = 0;
  if constexpr (R <= 3) {
    // Few rows: too few independent FMA chains to hide the FMA latency, so odd k go to a
    // second set of accumulators (the unused rows' registers), summed at the end.
    for (; k + 2 <= kc; k += 2) {
      const __m256 b0 = _mm256_loadu_ps(Bp + k * ldb), b1 = _mm256_loadu_ps(Bp + k * ldb + 8);
      const __m256 d0 = _mm256_loadu_ps(Bp + (k + 1) * ldb), d1 = _mm256_loadu_ps(Bp + (k + 1) * ldb + 8);
      {
        const __m256 a = _mm256_broadcast_ss(A + k), e = _mm256_broadcast_ss(A + k + 1);
        c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        c30 = _mm256_fmadd_ps(e, d0, c30); c31 = _mm256_fmadd_ps(e, d1, c31);
      }
      if constexpr (R > 1) {
        const __m256 a = _mm256_broadcast_ss(A + lda + k), e = _mm256_broadcast_ss(A + lda + k + 1);
        c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        c40 = _mm256_fmadd_ps(e, d0, c40); c41 = _mm256_fmadd_ps(e, d1, c41);
      }
      if constexpr (R > 2) {
        const __m256 a = _mm256_broadcast_ss(A + 2 * lda + k), e = _mm256_broadcast_ss(A + 2 * lda + k + 1);
        c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        c50 = _mm256_fmadd_ps(e, d0, c50); c51 = _mm256_fmadd_ps(e, d1, c51);
      }
    }
    c00 = _mm256_add_ps(c00, c30); c01 = _mm256_add_ps(c01, c31);
    c10 = _mm256_add_ps(c10, c40); c11 = _mm256_add_ps(c11, c41);
    c20 = _mm256_add_ps(c20, c50); c21 = _mm256_add_ps(c21, c51);
  }
  for (; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + k * ldb), b1 = _mm256_loadu_ps(Bp + k * ldb + 8);
    PS_ROW(0) PS_ROW(1) PS_ROW(2) PS_ROW(3) PS_ROW(4) PS_ROW(5)
  }
  const float* add = first ? bias : C;
  const int64_t add_ld = first ? 0 : ldc;
  PS_OUT(0) PS_OUT(1) PS_OUT(2) PS_OUT(3) PS_OUT(4) PS_OUT(5)
}
#undef PS_ROW
#undef PS_OUT

static inline void tile_rows(int64_t rows, const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C,
                             int64_t ldc, int64_t kc, bool first, const float* bias) {
  switch (rows) {
    case 6: tile<6>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
    case 5: tile<5>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
    case 4: tile<4>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
    case 3: tile<3>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
    case 2: tile<2>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
    default: tile<1>(A, lda, Bp, ldb, C, ldc, kc, first, bias); break;
  }
}
#endif
