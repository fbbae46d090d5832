// Attention math in bf16 on a bf16 KV cache, for CPUs with AVX512_BF16 (`--dtype bfloat16`, and
// `auto` where the CPU has the instruction): q.k and p.v as VDPBF16PS pair products with float32
// accumulation, as the bf16 GEMM does. The float32 path widens every cache value before an FMA
// (three instructions per 8 values, then one FMA per 8 products); here one instruction multiplies
// and adds 32 products straight from the cache. The scores, the online softmax and the output stay
// float32; what is rounded to bf16 is q (once per item) and the probabilities p (once per block).
//
// The cache layout is the float32 path's (rows of D values per token), so nothing else changes:
//  - q.k: row t of K is D/32 vectors of 16 pairs; q's pairs against them give 16 lanes of partial
//    sums per (head, token), reduced four tokens at a time (reduce4).
//  - p.v: rows t and t+1 of V interleave (unpacklo/hi_epi16) into pairs (v[t][d], v[t+1][d]), which
//    VDPBF16PS multiplies by the broadcast pair (p[t], p[t+1]). The unpack works within 128-bit
//    lanes, so the accumulator holds each 64-value chunk of D in a fixed permutation (acc_index);
//    rescaling is elementwise, so only the final read-out needs the order back.
//
// Compiled into the x86-64-v4 build only, with AVX512_BF16 enabled for these functions alone;
// callers check bf16_attention_supported() at run time first.
#pragma once

#include <algorithm>
#include <cstdint>

namespace attn_bf16 {
// Where value d of a head's D values sits in the p.v accumulator: within each chunk of 64, as
// d = 32a + 8L + 4b + m lands after unpack{lo,hi}_epi16 (a: which 32-value half, L: 128-bit lane,
// b: lo or hi unpack, m: pair within the lane).
inline int64_t acc_index(int64_t d) {
  const int64_t base = d & ~int64_t(63), r = d & 63;
  const int64_t a = r >> 5, L = (r >> 3) & 3, b = (r >> 2) & 1, m = r & 3;
  return base + 16 * (2 * a + b) + 4 * L + m;
}

// A row of values()'s scratch: n <= BS probabilities zero-padded to a multiple of 16; even.
inline int64_t pp_row(int64_t BS) { return (BS + 17) & ~int64_t(1); }
}  // namespace attn_bf16

#if defined(__AVX512F__) && defined(__GNUC__)
#define PS_ATTN_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include <immintrin.h>

namespace attn_bf16 {

// n float32 values -> bf16 (round to nearest even), zero-padded to a multiple of 16.
inline void round_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)b);
  }
}

// Four vectors' horizontal sums, in order.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // 128-bit lane i now holds a_i's sum in every slot
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
}

inline void prefetch_rows(const uint16_t* p, int64_t row, int64_t rows, int64_t D) {
  if (p == nullptr) return;
  const char* c = reinterpret_cast<const char*>(p + row * D);
  for (int64_t i = 0; i < rows * D * 2; i += 64) __builtin_prefetch(c + i, 0, 1);
}

// s[h * BS + t] = scale * q[h] . k[t] for h < NH, t < n. q: NH rows of D bf16 (D/2 pairs each);
// k rows D bf16 apart; D a multiple of 32.
template <int NH>
inline void scores(const uint16_t* q, const uint16_t* k, int64_t n, int64_t D, int64_t BS, float scale, float* s,
                   const uint16_t* next_k) {
  const __m128 sc = _mm_set1_ps(scale);
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    prefetch_rows(next_k, t, 4, D);
    __m512 a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < 4; ++j) a[h][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      __m512bh qv[NH];
      for (int h = 0; h < NH; ++h) qv[h] = (__m512bh)_mm512_loadu_si512(q + h * D + d);
      for (int j = 0; j < 4; ++j) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + (t + j) * D + d);
        for (int h = 0; h < NH; ++h) a[h][j] = _mm512_dpbf16_ps(a[h][j], qv[h], kv);
      }
    }
    for (int h = 0; h < NH; ++h) _mm_storeu_ps(s + h * BS + t, _mm_mul_ps(sc, reduce4(a[h][0], a[h][1], a[h][2], a[h][3])));
  }
  prefetch_rows(next_k, t, n - t, D);
  for (; t < n; ++t)
    for (int h = 0; h < NH; ++h) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + h * D + d), (__m512bh)_mm512_loadu_si512(k + t * D + d));
      s[h * BS + t] = _mm512_reduce_add_ps(a) * scale;
    }
}

// acc[h] += sum over t < n of p[h * BS + t] * v[t] for h < NH, acc in acc_index order; D a
// multiple of 64. pp: scratch for NH * pp_row(BS) bf16 probabilities.
template <int NH>
inline void values(const float* p, const uint16_t* v, int64_t n, int64_t D, int64_t BS, float* acc, uint16_t* pp,
                   const uint16_t* next_v) {
  const int64_t PS = pp_row(BS);
  for (int h = 0; h < NH; ++h) round_bf16(p + h * BS, n, pp + h * PS);
  const uint32_t* p2 = reinterpret_cast<const uint32_t*>(pp);  // (p[t], p[t+1]) pairs
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) a[h][c] = _mm512_loadu_ps(acc + h * D + d0 + 16 * c);
    for (int64_t t = 0; t < n; t += 2) {
      if (d0 == 0) prefetch_rows(next_v, t, std::min<int64_t>(2, n - t), D);
      const uint16_t* r0 = v + t * D + d0;
      const __m512i x0 = _mm512_loadu_si512(r0), x1 = _mm512_loadu_si512(r0 + 32);
      // Past the last token (odd n) the row is a zero vector, never the slot's stale bytes.
      const bool two = t + 1 < n;
      const __m512i y0 = two ? _mm512_loadu_si512(r0 + D) : zero, y1 = two ? _mm512_loadu_si512(r0 + D + 32) : zero;
      const __m512bh u[4] = {(__m512bh)_mm512_unpacklo_epi16(x0, y0), (__m512bh)_mm512_unpackhi_epi16(x0, y0),
                             (__m512bh)_mm512_unpacklo_epi16(x1, y1), (__m512bh)_mm512_unpackhi_epi16(x1, y1)};
      for (int h = 0; h < NH; ++h) {
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(p2[h * PS / 2 + t / 2]));
        for (int c = 0; c < 4; ++c) a[h][c] = _mm512_dpbf16_ps(a[h][c], u[c], pb);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + h * D + d0 + 16 * c, a[h][c]);
  }
}

}  // namespace attn_bf16

#pragma GCC pop_options
#endif

// Whether the bf16 attention path can run on this CPU (the x86-64-v4 build, AVX512_BF16 present).
inline bool bf16_attention_supported() {
#if defined(PS_ATTN_BF16)
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}
